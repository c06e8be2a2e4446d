use super::*;
use crate::daemon::resource::OpsSnapshot;

fn view(name: &str) -> ResourceView {
    ResourceView {
        name: name.to_string(),
        role: Role::Primary,
        peer_role: Role::Secondary,
        conn: ConnState::Connected,
        repl: ReplState::SyncSource,
        disk: DiskState::UpToDate,
        peer_disk: DiskState::Inconsistent,
        serving: true,
        authority: Authority::Lease,
        answering: true,
        size: 1 << 30,
        out_of_sync: 4 << 20,
        syncing: true,
        resync_rate: 2.5e6,
        resync_eta: 1.6,
        read_bytes: 4096,
        written_bytes: 8192,
        sent_bytes: 8192,
        writes_marked: 0,
        verify_mismatches: 0,
        lease_left: Some(Duration::from_millis(500)),
        lease_lapses: 1,
        peer_heard: true,
        ops: OpsSnapshot {
            engine_idle: Duration::from_millis(20),
            failovers: [2, 0, 1, 0],
            last_failover: Some(Duration::from_millis(1250)),
            aoe: Some(AoeTotals {
                requests: 10,
                replies: 9,
                reads: 3,
                writes: 4,
                aoe_errors: 1,
                ..Default::default()
            }),
            nbd: None,
            latency: Default::default(),
        },
    }
}

fn path() -> PathSnapshot {
    PathSnapshot {
        id: 0,
        local: "10.0.0.1".parse().unwrap(),
        peer: "10.0.0.2".parse().unwrap(),
        last_heard: Some(Duration::from_millis(150)),
        rtt: Some(Duration::from_micros(250)),
        silent: false,
    }
}

fn has(text: &str, line: &str) {
    assert!(
        text.lines().any(|l| l == line),
        "missing {line:?} in:\n{text}"
    );
}

#[test]
fn states_are_state_sets_with_one_current_value() {
    let mut b = view("r\"1");
    b.role = Role::Secondary;
    b.disk = DiskState::Outdated;
    let text = render(&[view("r0"), b], &[path()]);
    lint(&text).unwrap();
    has(&text, "# TYPE twinblade_role gauge");
    has(&text, r#"twinblade_role{resource="r0",role="Primary"} 1"#);
    has(&text, r#"twinblade_role{resource="r0",role="Secondary"} 0"#);
    // A label value is escaped.
    has(
        &text,
        r#"twinblade_role{resource="r\"1",role="Secondary"} 1"#,
    );
    has(
        &text,
        r#"twinblade_disk_state{resource="r0",disk="local",state="UpToDate"} 1"#,
    );
    has(
        &text,
        r#"twinblade_disk_state{resource="r0",disk="peer",state="Inconsistent"} 1"#,
    );
    has(
        &text,
        r#"twinblade_disk_state{resource="r\"1",disk="local",state="Outdated"} 1"#,
    );
    has(
        &text,
        r#"twinblade_connection_state{resource="r0",state="Connected"} 1"#,
    );
    has(
        &text,
        r#"twinblade_serve_authority{resource="r0",authority="lease"} 1"#,
    );
    // Exactly one state is current per resource and family.
    for family in [
        "twinblade_role{",
        "twinblade_connection_state{",
        "twinblade_replication_state{",
    ] {
        let ones = text
            .lines()
            .filter(|l| l.starts_with(family) && l.contains("resource=\"r0\"") && l.ends_with(" 1"))
            .count();
        assert_eq!(ones, 1, "{family}");
    }
}

#[test]
fn figures_counters_failovers_and_paths() {
    let text = render(&[view("r0")], &[path()]);
    lint(&text).unwrap();
    has(
        &text,
        r#"twinblade_out_of_sync_bytes{resource="r0"} 4194304"#,
    );
    has(
        &text,
        r#"twinblade_resync_rate_bytes_per_second{resource="r0"} 2500000"#,
    );
    has(&text, r#"twinblade_resync_eta_seconds{resource="r0"} 1.6"#);
    has(&text, "# TYPE twinblade_written_bytes_total counter");
    has(
        &text,
        r#"twinblade_written_bytes_total{resource="r0"} 8192"#,
    );
    has(&text, r#"twinblade_lease_held{resource="r0"} 1"#);
    has(&text, r#"twinblade_lease_seconds_left{resource="r0"} 0.5"#);
    has(
        &text,
        r#"twinblade_failovers_total{resource="r0",outcome="served"} 2"#,
    );
    has(
        &text,
        r#"twinblade_failovers_total{resource="r0",outcome="peer_back"} 1"#,
    );
    has(
        &text,
        r#"twinblade_last_failover_seconds{resource="r0"} 1.25"#,
    );
    has(&text, r#"twinblade_aoe_requests_total{resource="r0"} 10"#);
    has(
        &text,
        r#"twinblade_aoe_error_replies_total{resource="r0"} 1"#,
    );
    has(
        &text,
        r#"twinblade_heartbeat_last_heard_seconds{path="0",local="10.0.0.1",peer="10.0.0.2"} 0.15"#,
    );
    has(
        &text,
        r#"twinblade_heartbeat_round_trip_seconds{path="0",local="10.0.0.1",peer="10.0.0.2"} 0.00025"#,
    );
    // Never served over NBD: no NBD series at all, rather than zeros that look like data.
    assert!(!text.contains("twinblade_nbd_"), "{text}");
}

#[test]
fn nothing_known_means_no_series_not_made_up_ones() {
    let mut v = view("r0");
    v.lease_left = None;
    v.ops.last_failover = None;
    v.ops.aoe = None;
    let silent = PathSnapshot {
        last_heard: None,
        rtt: None,
        silent: true,
        ..path()
    };
    let text = render(&[v], &[silent]);
    lint(&text).unwrap();
    has(&text, r#"twinblade_lease_held{resource="r0"} 0"#);
    has(&text, r#"twinblade_lease_seconds_left{resource="r0"} 0"#);
    assert!(!text.contains("twinblade_last_failover_seconds"), "{text}");
    assert!(!text.contains("twinblade_aoe_"), "{text}");
    assert!(
        !text.contains("twinblade_heartbeat_last_heard_seconds"),
        "{text}"
    );
    has(
        &text,
        r#"twinblade_heartbeat_path_silent{path="0",local="10.0.0.1",peer="10.0.0.2"} 1"#,
    );
    assert_eq!(render(&[], &[]), "");
}

#[test]
fn latency_histograms_per_resource_and_op() {
    use crate::block::timed::IoLatency;
    let io = IoLatency::default();
    io.write.observe(Duration::from_micros(40));
    io.write.observe(Duration::from_micros(300));
    io.write.observe(Duration::from_millis(3));
    io.write.observe(Duration::from_secs(11));
    io.read.observe(Duration::from_micros(100));
    let mut v = view("r0");
    v.ops.latency = io.snapshot();
    let text = render(&[v, view("r1")], &[]);
    lint(&text).unwrap();
    has(&text, "# TYPE twinblade_io_latency_seconds histogram");
    let w = |rest: &str| format!("twinblade_io_latency_seconds{rest}");
    for line in [
        r#"_bucket{resource="r0",op="write",le="0.00005"} 1"#,
        r#"_bucket{resource="r0",op="write",le="0.0001"} 1"#,
        r#"_bucket{resource="r0",op="write",le="0.00025"} 1"#,
        r#"_bucket{resource="r0",op="write",le="0.0005"} 2"#,
        r#"_bucket{resource="r0",op="write",le="0.0025"} 2"#,
        r#"_bucket{resource="r0",op="write",le="0.005"} 3"#,
        r#"_bucket{resource="r0",op="write",le="10"} 3"#,
        r#"_bucket{resource="r0",op="write",le="+Inf"} 4"#,
        r#"_sum{resource="r0",op="write"} 11.00334"#,
        r#"_count{resource="r0",op="write"} 4"#,
        r#"_bucket{resource="r0",op="read",le="0.00005"} 0"#,
        r#"_bucket{resource="r0",op="read",le="0.0001"} 1"#,
        r#"_count{resource="r0",op="read"} 1"#,
        r#"_bucket{resource="r0",op="flush",le="+Inf"} 0"#,
        r#"_sum{resource="r0",op="flush"} 0"#,
        r#"_count{resource="r1",op="write"} 0"#,
    ] {
        has(&text, &w(line));
    }
    // 18 buckets, a sum and a count per resource and op, and the two comment lines.
    let lines = text
        .lines()
        .filter(|l| l.contains("twinblade_io_latency_seconds"))
        .count();
    assert_eq!(lines, 2 * 3 * 20 + 2);
    assert!(!render(&[], &[]).contains("latency"));
}

#[test]
fn the_lint_catches_what_a_scraper_would_reject() {
    let good = "# HELP a_total x\n# TYPE a_total counter\na_total{r=\"x\\\"y\"} 1\n";
    lint(good).unwrap();
    let histogram =
        "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 1\nh_sum 0.5\nh_count 1\n";
    lint(histogram).unwrap();
    for bad in [
        "# TYPE h histogram\nh_bucket 1\n", // bucket without le
        "# TYPE h histogram\nh 1\n",        // a histogram's bare name
        "# TYPE h gauge\nh_sum 1\n",        // a gauge's _sum
        "# TYPE h histogram\nh_total 1\n",  // not a histogram suffix
        "# TYPE a counter\na 1\n",          // counter without _total
        "a 1\n",                            // sample before TYPE
        "# TYPE a gauge\na{r=\"x} 1\n",     // unterminated value
        "# TYPE a gauge\na{r=x} 1\n",       // unquoted value
        "# TYPE a gauge\na{1r=\"x\"} 1\n",  // bad label name
        "# TYPE a gauge\na one\n",          // bad value
        "# TYPE a gauge\na 1\na 2\n",       // series twice
        "# TYPE a gauge\na 1\n# TYPE b gauge\nb 1\n# HELP a x\n", // family split
        "# TYPE a gauge\na{r=\"\\x\"} 1\n", // bad escape
        "# TYPE a gauge\na 1",              // no final newline
    ] {
        assert!(lint(bad).is_err(), "accepted {bad:?}");
    }
}

#[test]
fn only_get_metrics_is_served() {
    assert_eq!(
        respond_to("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").0,
        "200 OK"
    );
    assert_eq!(respond_to("GET /metrics?x=1 HTTP/1.0\r\n\r\n").0, "200 OK");
    assert_eq!(respond_to("GET / HTTP/1.1\r\n\r\n").0, "404 Not Found");
    let post = respond_to("POST /metrics HTTP/1.1\r\n\r\n");
    assert_eq!(post.0, "405 Method Not Allowed");
    assert_eq!(post.1, "Allow: GET\r\n");
    assert_eq!(respond_to("").0, "405 Method Not Allowed");
}
