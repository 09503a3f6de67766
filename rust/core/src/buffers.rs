//! Recycled memory for large results.
//!
//! A fresh 64 MiB result costs more than the work that fills it: the kernel faults in and
//! zeroes every page on first touch (measured here: 8–10 ms of a 16 ms 2-bit unpack of 8192²
//! codes). Callers that produce results of the same sizes again and again — a converter
//! walking identical transformer blocks, a benchmark loop, a sweep — can instead reuse the
//! pages of a result they already dropped. [`BufferPool`] keeps a bounded number of such
//! idle anonymous mappings, already faulted in, and hands one out when a request of the same
//! size comes (the role jemalloc's dirty-page cache plays for a whole process, here for the
//! few large outputs whose memory the bindings own).
//!
//! A recycled buffer holds whatever its last user wrote: it is only for outputs that the
//! caller overwrites completely.
use std::collections::VecDeque;
use std::io;
use std::sync::Mutex;

use memmap2::MmapMut;

/// An owned, page-aligned, writeable region of `len` bytes: an anonymous mapping (zero-filled
/// when new) or one recycled by a [`BufferPool`] (stale contents).
#[derive(Debug)]
pub struct Buffer {
    map: MmapMut,
    recycled: bool,
}

impl Buffer {
    /// A new anonymous mapping, advised for transparent huge pages on Linux so that first
    /// touch faults 2 MiB at a time.
    pub fn new(len: usize) -> io::Result<Self> {
        // A zero-length mapping is an error for mmap; one page stands in for it.
        let map = MmapMut::map_anon(len.max(1))?;
        #[cfg(target_os = "linux")]
        {
            // Best effort: THP may be disabled ("never"), which only makes the hint unused.
            let _ = map.advise(memmap2::Advice::HugePage);
        }
        Ok(Self {
            map,
            recycled: false,
        })
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Whether this buffer was handed out again by a pool (its pages are resident; its
    /// contents are a previous result's).
    pub fn recycled(&self) -> bool {
        self.recycled
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.map.as_mut_ptr()
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.map
    }
}

/// Counters and limits of a [`BufferPool`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PoolStats {
    /// Idle bytes held for reuse now.
    pub cached_bytes: usize,
    pub cached_buffers: usize,
    /// The most idle bytes the pool keeps (0 disables recycling).
    pub max_bytes: usize,
    /// Requests served by a recycled buffer / by a new mapping.
    pub hits: u64,
    pub misses: u64,
}

#[derive(Debug)]
struct Inner {
    /// Idle buffers, oldest first (evicted first).
    idle: VecDeque<MmapMut>,
    stats: PoolStats,
}

/// A bounded cache of idle buffers, matched by exact length.
#[derive(Debug)]
pub struct BufferPool {
    inner: Mutex<Inner>,
}

impl BufferPool {
    pub const fn new(max_bytes: usize) -> Self {
        Self {
            inner: Mutex::new(Inner {
                idle: VecDeque::new(),
                stats: PoolStats {
                    cached_bytes: 0,
                    cached_buffers: 0,
                    max_bytes,
                    hits: 0,
                    misses: 0,
                },
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The pool's state stays consistent across a panic (every update is one push/pop plus
        // counters), so a poisoned lock is still usable.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A buffer of exactly `len` bytes: the most recently returned idle one of that length,
    /// or a new mapping.
    pub fn take(&self, len: usize) -> io::Result<Buffer> {
        let len = len.max(1);
        {
            let mut g = self.lock();
            if let Some(i) = g.idle.iter().rposition(|m| m.len() == len) {
                let map = g.idle.remove(i).expect("index from rposition");
                g.stats.cached_bytes -= len;
                g.stats.hits += 1;
                return Ok(Buffer {
                    map,
                    recycled: true,
                });
            }
            g.stats.misses += 1;
        }
        Buffer::new(len)
    }

    /// Returns a buffer for reuse; the oldest idle buffers are unmapped to stay within
    /// `max_bytes`, and a buffer larger than `max_bytes` is unmapped at once.
    pub fn give(&self, buf: Buffer) {
        let evicted = {
            let mut g = self.lock();
            if buf.len() > g.stats.max_bytes {
                return; // dropped (unmapped) here, outside the pool
            }
            g.stats.cached_bytes += buf.len();
            g.idle.push_back(buf.map);
            Self::evict(&mut g)
        };
        drop(evicted); // munmap outside the lock
    }

    fn evict(g: &mut Inner) -> Vec<MmapMut> {
        let mut out = Vec::new();
        while g.stats.cached_bytes > g.stats.max_bytes {
            let m = g.idle.pop_front().expect("cached_bytes > 0 means a buffer");
            g.stats.cached_bytes -= m.len();
            out.push(m);
        }
        out
    }

    /// Changes the limit, unmapping the oldest idle buffers above it (0 empties the pool and
    /// disables recycling).
    pub fn set_max_bytes(&self, max_bytes: usize) {
        let evicted = {
            let mut g = self.lock();
            g.stats.max_bytes = max_bytes;
            Self::evict(&mut g)
        };
        drop(evicted);
    }

    pub fn max_bytes(&self) -> usize {
        self.lock().stats.max_bytes
    }

    /// Unmaps every idle buffer (the limit is kept).
    pub fn clear(&self) {
        let idle = {
            let mut g = self.lock();
            g.stats.cached_bytes = 0;
            std::mem::take(&mut g.idle)
        };
        drop(idle);
    }

    pub fn stats(&self) -> PoolStats {
        let g = self.lock();
        PoolStats {
            cached_buffers: g.idle.len(),
            ..g.stats
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    #[test]
    fn new_buffers_are_zeroed_and_writeable() {
        let mut b = Buffer::new(3 * MIB + 5).unwrap();
        assert_eq!(b.len(), 3 * MIB + 5);
        assert!(!b.recycled());
        assert!(b.as_mut_slice().iter().all(|&x| x == 0));
        b.as_mut_slice().fill(7);
        assert!(b.as_mut_slice().iter().all(|&x| x == 7));
        assert_eq!(b.as_mut_ptr() as usize % 4096, 0, "page-aligned");
    }

    #[test]
    fn a_returned_buffer_is_reused_for_the_same_length_only() {
        let pool = BufferPool::new(64 * MIB);
        let mut a = pool.take(4 * MIB).unwrap();
        a.as_mut_slice()[0] = 42;
        let pa = a.as_mut_ptr() as usize;
        pool.give(a);
        assert_eq!(pool.stats().cached_bytes, 4 * MIB);

        let mut other = pool.take(4 * MIB + 1).unwrap(); // another length: a new mapping
        assert!(!other.recycled());
        assert_ne!(other.as_mut_ptr() as usize, pa);

        let mut again = pool.take(4 * MIB).unwrap();
        assert!(again.recycled());
        assert_eq!(again.as_mut_ptr() as usize, pa);
        assert_eq!(again.as_mut_slice()[0], 42, "stale contents are kept");
        let s = pool.stats();
        assert_eq!(
            (s.hits, s.misses, s.cached_bytes, s.cached_buffers),
            (1, 2, 0, 0)
        );
    }

    #[test]
    fn the_limit_evicts_oldest_first_and_zero_disables() {
        let pool = BufferPool::new(10 * MIB);
        let bufs: Vec<Buffer> = (1..=4).map(|i| pool.take(i * MIB).unwrap()).collect();
        for b in bufs {
            pool.give(b); // 1 + 2 + 3 + 4 = 10 MiB: all fit
        }
        assert_eq!(pool.stats().cached_buffers, 4);
        pool.give(pool.take(5 * MIB).unwrap()); // 15 MiB: evicts 1, 2 (oldest) → 12, then 3 → 9
        let s = pool.stats();
        assert_eq!((s.cached_bytes, s.cached_buffers), (9 * MIB, 2));
        assert!(pool.take(4 * MIB).unwrap().recycled());
        assert!(pool.take(5 * MIB).unwrap().recycled());
        assert!(!pool.take(3 * MIB).unwrap().recycled());

        pool.give(pool.take(11 * MIB).unwrap()); // above the limit: never kept
        assert_eq!(pool.stats().cached_bytes, 0);

        pool.give(pool.take(MIB).unwrap());
        pool.set_max_bytes(0);
        let s = pool.stats();
        assert_eq!((s.cached_bytes, s.max_bytes), (0, 0));
        pool.give(pool.take(MIB).unwrap());
        assert_eq!(pool.stats().cached_buffers, 0);
    }

    #[test]
    fn clear_keeps_the_limit() {
        let pool = BufferPool::new(8 * MIB);
        pool.give(pool.take(MIB).unwrap());
        pool.clear();
        let s = pool.stats();
        assert_eq!(
            (s.cached_bytes, s.cached_buffers, s.max_bytes),
            (0, 0, 8 * MIB)
        );
        assert!(!pool.take(MIB).unwrap().recycled());
    }
}
