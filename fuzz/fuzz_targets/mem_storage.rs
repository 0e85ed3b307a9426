//! An in-memory `Storage` for the fuzz targets.

use std::io;
use std::sync::Mutex;

use addcow::Storage;

/// Bytes in memory, growing on writes past the end.
#[derive(Debug, Default)]
pub struct MemStorage(pub Mutex<Vec<u8>>);

impl MemStorage {
    /// Storage holding `bytes`.
    pub fn new(bytes: Vec<u8>) -> Self {
        MemStorage(Mutex::new(bytes))
    }
}

fn bytes(s: &MemStorage) -> std::sync::MutexGuard<'_, Vec<u8>> {
    s.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Storage for MemStorage {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let b = bytes(self);
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let src = b.get(start..start + buf.len()).ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut b = bytes(self);
        let end = offset as usize + buf.len();
        if b.len() < end {
            b.resize(end, 0);
        }
        b[offset as usize..end].copy_from_slice(buf);
        Ok(())
    }
    fn sync_data(&self) -> io::Result<()> {
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(bytes(self).len() as u64)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.write_all_at(&vec![0; len as usize], offset)
    }
}
