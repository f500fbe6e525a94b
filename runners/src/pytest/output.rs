/// Keeps the first `cap` bytes of a process's output and counts what it dropped.
#[derive(Debug, Clone)]
pub struct OutputCap {
    cap: usize,
    buf: Vec<u8>,
    dropped: u64,
}

impl OutputCap {
    /// A buffer keeping at most `kib` KiB.
    pub fn new_kib(kib: u64) -> OutputCap {
        let cap = usize::try_from(kib.saturating_mul(1024)).unwrap_or(usize::MAX);
        OutputCap { cap, buf: Vec::new(), dropped: 0 }
    }

    pub fn push(&mut self, data: &[u8]) {
        let room = self.cap.saturating_sub(self.buf.len());
        let keep = room.min(data.len());
        self.buf.extend_from_slice(&data[..keep]);
        self.dropped += (data.len() - keep) as u64;
    }

    /// Records `n` bytes dropped elsewhere (e.g. by a process that capped the output itself).
    pub fn note_dropped(&mut self, n: u64) {
        self.dropped += n;
    }

    pub fn truncated(&self) -> bool {
        self.dropped > 0
    }

    /// The kept output (lossy UTF-8; a marker line says how much was dropped) and whether it
    /// was truncated.
    pub fn finish(self) -> (String, bool) {
        let mut text = String::from_utf8_lossy(&self.buf).into_owned();
        if self.dropped > 0 {
            text.push_str(&format!("\n[cdtester: output truncated, {} more bytes dropped]\n", self.dropped));
        }
        (text, self.dropped > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_head_and_marks_truncation() {
        let mut cap = OutputCap::new_kib(1);
        cap.push(&[b'a'; 1000]);
        assert!(!cap.truncated());
        cap.push(&[b'b'; 100]);
        assert!(cap.truncated());
        let (text, truncated) = cap.finish();
        assert!(truncated);
        assert!(text.starts_with(&"a".repeat(1000)));
        assert!(text.contains(&"b".repeat(24)));
        assert!(text.contains("76 more bytes dropped"));
    }

    #[test]
    fn small_output_is_kept_whole() {
        let mut cap = OutputCap::new_kib(1);
        cap.push("héllo".as_bytes());
        assert_eq!(cap.finish(), ("héllo".to_string(), false));
    }
}
