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

    /// Reads the next line into `buf` without its line ending, keeping at most `keep` bytes of
    /// it, and returns the line's whole length (`None` at the end). A line longer than `keep`
    /// is read through but not held: one huge line costs no more memory than `keep`.
    pub fn next_line(&mut self, buf: &mut Vec<u8>, keep: usize) -> io::Result<Option<usize>> {
        buf.clear();
        let mut length = 0usize;
        let mut ended = false;
        let mut any = false;
        while !ended {
            let available = self.reader.fill_buf()?;
            if available.is_empty() {
                break;
            }
            any = true;
            let chunk = match available.iter().position(|&b| b == b'\n') {
                Some(end) => {
                    ended = true;
                    &available[..end]
                }
                None => available,
            };
            let room = keep.saturating_sub(buf.len());
            buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
            length += chunk.len();
            let used = chunk.len() + usize::from(ended);
            self.reader.consume(used);
        }
        if !any {
            return Ok(None);
        }
        if length <= keep && buf.last() == Some(&b'\r') {
            buf.pop();
            length -= 1;
        }
        // Files saved by some Windows tools start with a byte-order mark; it is not part of
        // the first event.
        if std::mem::take(&mut self.first) && buf.starts_with(b"\xEF\xBB\xBF") {
            buf.drain(..3);
            length -= 3;
        }
        Ok(Some(length))
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
        assert_eq!(reader.next_line(&mut line, 100).expect("reads"), Some(7));
        assert_eq!(line, b"{\"a\":1}");
        // Only the file's first bytes are a mark; elsewhere they are the line's content.
        assert_eq!(reader.next_line(&mut line, 100).expect("reads"), Some(10));
        assert_eq!(line, b"\xEF\xBB\xBF{\"a\":2}");
        assert_eq!(reader.next_line(&mut line, 100).expect("reads"), None);
    }

    #[test]
    fn a_line_longer_than_kept_is_measured_but_not_held() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("long.jsonl");
        let long = "x".repeat(200_000);
        std::fs::write(&path, format!("{long}\r\nshort\nlast")).expect("written");
        let mut reader = LineReader::open(&path).expect("opens");
        let mut line = Vec::new();
        assert_eq!(
            reader.next_line(&mut line, 10).expect("reads"),
            Some(200_001)
        );
        assert_eq!(line.len(), 10, "only the kept prefix is held");
        assert_eq!(reader.next_line(&mut line, 10).expect("reads"), Some(5));
        assert_eq!(line, b"short");
        assert_eq!(reader.next_line(&mut line, 10).expect("reads"), Some(4));
        assert_eq!(line, b"last");
        assert_eq!(reader.next_line(&mut line, 10).expect("reads"), None);
    }
}
