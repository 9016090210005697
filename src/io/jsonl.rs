//! Line-oriented event files, plain or gzip-compressed (detected from the content).

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use flate2::read::MultiGzDecoder;

/// Counts the bytes read from the file (compressed bytes for gzip), for progress bars.
struct CountingReader<R> {
    inner: R,
    count: Arc<AtomicU64>,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// A JSONL source: lines as raw bytes, whatever their encoding.
pub struct LineReader {
    reader: Box<dyn BufRead>,
    /// Whether the next line is the first (which may start with a UTF-8 byte-order mark).
    first: bool,
    bytes_read: Arc<AtomicU64>,
    pub total_bytes: u64,
}

impl LineReader {
    pub fn open(path: &Path) -> io::Result<LineReader> {
        let mut file = File::open(path)?;
        let total_bytes = file.metadata()?.len();
        let mut magic = [0u8; 2];
        let got = file.read(&mut magic)?;
        let count = Arc::new(AtomicU64::new(0));
        let head = io::Cursor::new(magic[..got].to_vec());
        let raw = CountingReader {
            inner: head.chain(file),
            count: Arc::clone(&count),
        };
        let reader: Box<dyn BufRead> = if got == 2 && magic == [0x1f, 0x8b] {
            Box::new(BufReader::with_capacity(
                1 << 16,
                MultiGzDecoder::new(BufReader::new(raw)),
            ))
        } else {
            Box::new(BufReader::with_capacity(1 << 16, raw))
        };
        Ok(LineReader {
            reader,
            first: true,
            bytes_read: count,
            total_bytes,
        })
    }

    pub fn bytes_read(&self) -> u64 {
        self.bytes_read.load(Ordering::Relaxed)
    }

    /// Reads the next line into `buf` without its line ending; false at the end.
    pub fn next_line(&mut self, buf: &mut Vec<u8>) -> io::Result<bool> {
        buf.clear();
        if self.reader.read_until(b'\n', buf)? == 0 {
            return Ok(false);
        }
        if buf.last() == Some(&b'\n') {
            buf.pop();
            if buf.last() == Some(&b'\r') {
                buf.pop();
            }
        }
        // Files saved by some Windows tools start with a byte-order mark; it is not part of
        // the first event.
        if std::mem::take(&mut self.first) && buf.starts_with(b"\xEF\xBB\xBF") {
            buf.drain(..3);
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_byte_order_mark_is_not_part_of_the_first_line() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("bom.jsonl");
        std::fs::write(&path, b"\xEF\xBB\xBF{\"a\":1}\r\n\xEF\xBB\xBF{\"a\":2}\n")
            .expect("written");
        let mut reader = LineReader::open(&path).expect("opens");
        let mut line = Vec::new();
        assert!(reader.next_line(&mut line).expect("reads"));
        assert_eq!(line, b"{\"a\":1}");
        // Only the file's first bytes are a mark; elsewhere they are the line's content.
        assert!(reader.next_line(&mut line).expect("reads"));
        assert_eq!(line, b"\xEF\xBB\xBF{\"a\":2}");
        assert!(!reader.next_line(&mut line).expect("reads"));
    }
}
