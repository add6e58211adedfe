//! The process's memory allocators: jemalloc for Rust, glibc's malloc (tuned) for
//! librdkafka's C code.
//!
//! Rust allocations go to jemalloc. With glibc's malloc the pipeline thread spent
//! about half its time allocating and freeing (decoded events, engine changes,
//! statement parameters: short-lived, and freed on other threads than made them). In
//! alternating runs of the pipeline benchmark jemalloc raised the mean rate by 14%
//! while the host was in its slower state and by 4% in its faster one (README).
//! jemalloc normally keeps freed pages for 10 s before giving them back, which made a
//! 100k-message drain peak at 57 MB instead of 43-47; with both decays at 0 freed
//! pages go back at once, so resident memory follows live memory, which is what the
//! window's and the batch's bounds bound. (Decays of 10 to 500 ms were a little faster
//! but peaked at 49-54 MB on the same drain.) jemalloc also gives every CPU four
//! arenas by default, each keeping its own partly used pages; the window's entries,
//! made and freed on whichever tokio thread runs the pipeline, spread over all of them.
//! One arena lowered a 5M-message drain's peak from 48.4 to 46.0 MB (100k: 42 MB
//! either way) at the same pipeline rate (five alternating pairs: mean 85.9k against
//! 86.6k events/s, within the host's noise).
//!
//! librdkafka's allocations stay with glibc. Left alone, glibc made memory grow with
//! the length of a backlog: every thread got its own arena, and the mmap threshold
//! adapted upwards, so large short-lived buffers (fetch buffers) landed in the arenas
//! and their pages stayed resident after they were freed. A fixed 256 KiB threshold
//! keeps such buffers in their own mappings, returned on free, and one arena keeps the
//! free fragments in one place.

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's `malloc_conf`, read before `main`. The environment variable
/// `_RJEM_MALLOC_CONF` is applied after it, for experiments.
#[repr(transparent)]
pub struct MallocConf(*const std::ffi::c_char);

// SAFETY: the pointer is to a static, immutable C string.
unsafe impl Sync for MallocConf {}

#[unsafe(export_name = "_rjem_malloc_conf")]
#[used]
pub static MALLOC_CONF: MallocConf =
    MallocConf(c"dirty_decay_ms:0,muzzy_decay_ms:0,narenas:1".as_ptr());

/// Sets glibc's allocator up. Call first thing in `main`, before any other thread
/// exists. The environment variables (`MALLOC_ARENA_MAX`, `MALLOC_MMAP_THRESHOLD_`)
/// still win, for experiments.
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let set = |name: &str| std::env::var_os(name).is_some();
        // SAFETY: mallopt only sets allocator parameters, and no other thread exists
        // yet to allocate concurrently.
        unsafe {
            if !set("MALLOC_ARENA_MAX") {
                libc::mallopt(libc::M_ARENA_MAX, 1);
            }
            if !set("MALLOC_MMAP_THRESHOLD_") {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
            }
        }
    }
}
