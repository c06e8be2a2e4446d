//! A device that stores nothing: writes vanish, reads return zeros.
//!
//! For tests and benchmarks of the export paths, where the cost and behaviour of real storage
//! would only get in the way. It still enforces the geometry (range checks) like a real device,
//! so exports' bounds handling is exercised.

use super::{check_range, BlockDevice, Capabilities, Result, SECTOR_SIZE};

/// A device of a fixed size that discards writes and reads zeros.
#[derive(Debug, Clone)]
pub struct NullDevice {
    size: u64,
}

impl NullDevice {
    /// A null device of `size_bytes`, rounded down to a multiple of [`SECTOR_SIZE`].
    pub fn new(size_bytes: u64) -> Self {
        Self {
            size: size_bytes - size_bytes % SECTOR_SIZE,
        }
    }
}

impl BlockDevice for NullDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            read_only: false,
            discard: true,
            write_zeroes: true,
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(self.size, offset, buf.len() as u64)?;
        buf.fill(0);
        Ok(())
    }

    fn write_at(&self, data: &[u8], offset: u64, _fua: bool) -> Result<()> {
        check_range(self.size, offset, data.len() as u64)
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        check_range(self.size, offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64, _fua: bool) -> Result<()> {
        check_range(self.size, offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::testing;
    use crate::block::BlockError;

    #[test]
    fn size_is_rounded_down_to_sectors() {
        assert_eq!(NullDevice::new(1 << 20).size(), 1 << 20);
        assert_eq!(NullDevice::new(1000).size(), 512);
        assert_eq!(NullDevice::new(100).size(), 0);
    }

    #[test]
    fn reads_zeros_after_write() {
        let dev = NullDevice::new(64 * 1024);
        dev.write_at(&[0xab; 4096], 4096, true).unwrap();
        let mut buf = [0xffu8; 4096];
        dev.read_at(&mut buf, 4096).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
    }

    #[test]
    fn rejects_out_of_range() {
        let dev = NullDevice::new(4096);
        let mut buf = [0xffu8; 512];
        assert!(matches!(
            dev.read_at(&mut buf, 4096),
            Err(BlockError::OutOfRange { .. })
        ));
        assert_eq!(buf, [0xff; 512], "a refused read leaves the buffer alone");
        assert!(matches!(
            dev.write_zeroes(0, 8192, false),
            Err(BlockError::OutOfRange { .. })
        ));
        assert!(matches!(
            dev.discard(4096, 1),
            Err(BlockError::OutOfRange { .. })
        ));
    }

    #[test]
    fn flush_discard_and_write_zeroes_succeed() {
        let dev = NullDevice::new(8192);
        dev.flush().unwrap();
        dev.discard(0, 8192).unwrap();
        dev.write_zeroes(512, 1024, true).unwrap();
        assert!(dev.capabilities().discard && dev.capabilities().write_zeroes);
    }

    #[test]
    fn passes_the_geometry_contract() {
        testing::geometry_suite(&NullDevice::new(1 << 20));
    }
}
