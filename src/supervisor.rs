//! [`Supervisor`]: the one place a process starts its long-running threads and tasks.
//!
//! Every thread or task gets a name and a cancellation token, a child of its group's. A group
//! stops its children in reverse start order — each one's token cancelled, then the child
//! joined — so nothing is detached and nothing outlives the stop. Groups nest: `twinblade run`
//! has one root; each resource's engine owns a group for what it starts (the connection's
//! reader and applier, the resync copier, the verifier, the AoE port threads, the NBD task),
//! and stopping a group stops its groups too. The root owns the process's one tokio runtime.
//!
//! Waiting is on the token, never by polling it: [`Supervisor::sleep`] returns early when the
//! group is cancelled, and [`Supervisor::wait`] returns when it is.

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// A group of named threads and tasks, stopped together (see the module docs). Cheap to clone:
/// clones are handles to the same group.
#[derive(Clone)]
pub struct Supervisor {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    token: CancellationToken,
    runtime: Option<tokio::runtime::Handle>,
    children: Mutex<Vec<Child>>,
}

struct Child {
    name: String,
    token: CancellationToken,
    kind: ChildKind,
}

enum ChildKind {
    Thread(std::thread::JoinHandle<()>),
    Task(tokio::task::JoinHandle<()>),
    Group(Supervisor),
}

impl Child {
    fn is_finished(&self) -> bool {
        match &self.kind {
            ChildKind::Thread(t) => t.is_finished(),
            ChildKind::Task(t) => t.is_finished(),
            ChildKind::Group(_) => false,
        }
    }
}

/// The root of a process: a [`Supervisor`] that owns the tokio runtime. Stop it (and so every
/// group below it) with [`Supervisor::stop`] before dropping it.
pub struct Root {
    supervisor: Supervisor,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Root {
    /// A root with a tokio runtime of `workers` threads, whose token is `token`.
    pub fn new(name: &str, token: CancellationToken, workers: usize) -> std::io::Result<Root> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers.max(1))
            .thread_name(format!("{name}-rt"))
            .enable_all()
            .build()?;
        let supervisor = Supervisor::with(name, token, Some(runtime.handle().clone()));
        Ok(Root {
            supervisor,
            runtime: Some(runtime),
        })
    }

    /// A root for threads only (no runtime): tasks, [`Supervisor::sleep`] and
    /// [`Supervisor::wait`] are not available.
    pub fn threads_only(name: &str, token: CancellationToken) -> Root {
        Root {
            supervisor: Supervisor::with(name, token, None),
            runtime: None,
        }
    }
}

impl std::ops::Deref for Root {
    type Target = Supervisor;
    fn deref(&self) -> &Supervisor {
        &self.supervisor
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        self.supervisor.stop();
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Supervisor {
    fn with(
        name: &str,
        token: CancellationToken,
        runtime: Option<tokio::runtime::Handle>,
    ) -> Supervisor {
        Supervisor {
            inner: Arc::new(Inner {
                name: name.to_string(),
                token,
                runtime,
                children: Mutex::new(Vec::new()),
            }),
        }
    }

    /// The group's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The group's token: cancelled when the group is stopped (or its parent is).
    pub fn token(&self) -> &CancellationToken {
        &self.inner.token
    }

    /// The process's tokio runtime. Panics in a threads-only root (a programming error).
    pub fn runtime(&self) -> &tokio::runtime::Handle {
        self.inner
            .runtime
            .as_ref()
            .expect("this supervisor has no runtime")
    }

    fn register(&self, name: String, token: CancellationToken, kind: ChildKind) {
        let mut children = lock(&self.inner.children);
        // Finished children are joined already in effect; keep the list short.
        children.retain(|c| !c.is_finished());
        children.push(Child { name, token, kind });
    }

    /// Starts a thread named `name` running `f` with its own token (a child of the group's).
    pub fn spawn(
        &self,
        name: impl Into<String>,
        f: impl FnOnce(CancellationToken) + Send + 'static,
    ) -> std::io::Result<()> {
        let name = name.into();
        let token = self.inner.token.child_token();
        let handle = {
            let token = token.clone();
            std::thread::Builder::new()
                .name(name.clone())
                .spawn(move || f(token))?
        };
        self.register(name, token, ChildKind::Thread(handle));
        Ok(())
    }

    /// Starts a task named `name` on the runtime, with its own token.
    pub fn spawn_task<F, Fut>(&self, name: impl Into<String>, f: F)
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let name = name.into();
        let token = self.inner.token.child_token();
        let handle = self.runtime().spawn(f(token.clone()));
        self.register(name, token, ChildKind::Task(handle));
    }

    /// A nested group named `name`, stopped with this one (or on its own, earlier).
    pub fn group(&self, name: impl Into<String>) -> Supervisor {
        let name = name.into();
        let token = self.inner.token.child_token();
        let group = Supervisor::with(&name, token.clone(), self.inner.runtime.clone());
        self.register(name, token, ChildKind::Group(group.clone()));
        group
    }

    /// Sleeps for `d` unless the group is cancelled first. Returns whether the whole time
    /// passed (false: stop now). Call from a thread, not from a task.
    pub fn sleep(&self, d: Duration) -> bool {
        self.sleep_on(&self.inner.token, d)
    }

    /// [`Supervisor::sleep`] on another token: a child's own, which is cancelled first when
    /// its group stops.
    pub fn sleep_on(&self, token: &CancellationToken, d: Duration) -> bool {
        if token.is_cancelled() {
            return false;
        }
        self.runtime().block_on(async {
            tokio::select! {
                _ = token.cancelled() => false,
                _ = tokio::time::sleep(d) => true,
            }
        })
    }

    /// Blocks until the group is cancelled. Call from a thread, not from a task.
    pub fn wait(&self) {
        let token = self.inner.token.clone();
        self.runtime().block_on(token.cancelled_owned());
    }

    /// Stops the group: every child, in reverse start order, is cancelled and joined (nested
    /// groups stop their own children the same way); then the group's token is cancelled.
    /// Call from a thread that is not itself a child of this group, and not from a task.
    pub fn stop(&self) {
        loop {
            // A child may start others while it stops (rarely): take them in rounds.
            let children = std::mem::take(&mut *lock(&self.inner.children));
            if children.is_empty() {
                break;
            }
            for child in children.into_iter().rev() {
                child.token.cancel();
                tracing::debug!(group = %self.inner.name, child = %child.name, "stopping");
                match child.kind {
                    ChildKind::Thread(t) => {
                        if t.join().is_err() {
                            tracing::error!(group = %self.inner.name, child = %child.name, "thread panicked");
                        }
                    }
                    ChildKind::Task(t) => {
                        let _ = self.runtime().block_on(t);
                    }
                    ChildKind::Group(g) => g.stop(),
                }
            }
        }
        self.inner.token.cancel();
    }

    /// Names of the children still registered (running, or finished and not yet reaped).
    pub fn children(&self) -> Vec<String> {
        lock(&self.inner.children)
            .iter()
            .filter(|c| !c.is_finished())
            .map(|c| c.name.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn children_stop_in_reverse_start_order_and_are_joined() {
        let root = Root::new("t", CancellationToken::new(), 1).unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        for name in ["first", "second", "third"] {
            let order = order.clone();
            root.spawn(name, move |token| {
                while !token.is_cancelled() {
                    std::thread::sleep(Duration::from_millis(1));
                }
                lock(&order).push(name);
            })
            .unwrap();
        }
        root.stop();
        assert_eq!(*lock(&order), ["third", "second", "first"]);
        assert!(root.token().is_cancelled());
        assert!(root.children().is_empty());
    }

    #[test]
    fn a_group_stops_with_its_parent_and_tasks_are_awaited() {
        let root = Root::new("t", CancellationToken::new(), 1).unwrap();
        let group = root.group("resource");
        let done = Arc::new(AtomicUsize::new(0));
        {
            let done = done.clone();
            group.spawn_task("task", move |token| async move {
                token.cancelled().await;
                done.fetch_add(1, Ordering::SeqCst);
            });
        }
        {
            let done = done.clone();
            let g = group.clone();
            group
                .spawn("sleeper", move |_| {
                    // Sleeps on the token: returns at once when the group stops.
                    assert!(!g.sleep(Duration::from_secs(3600)));
                    done.fetch_add(1, Ordering::SeqCst);
                })
                .unwrap();
        }
        let t = std::time::Instant::now();
        root.stop();
        assert_eq!(done.load(Ordering::SeqCst), 2);
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "stop waited for a sleep"
        );
    }

    #[test]
    fn finished_children_are_reaped_and_sleep_runs_its_course_when_not_stopped() {
        let root = Root::new("t", CancellationToken::new(), 1).unwrap();
        root.spawn("quick", |_| {}).unwrap();
        while !root.children().is_empty() {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(root.sleep(Duration::from_millis(5)));
        root.spawn("another", |_| {}).unwrap();
        assert!(lock(&root.inner.children).len() <= 2);
    }
}
