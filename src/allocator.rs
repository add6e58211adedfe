//! The process's memory allocator (glibc): settings made at start.
//!
//! Left alone, glibc made the worker's memory grow with the length of a backlog
//! (1M messages: 104 MB peak, against 64 MB for 100k). Every thread got its own
//! arena, and the mmap threshold adapted upwards, so large short-lived buffers (fetch
//! buffers, a batch's statement parameters) landed in the arenas and their pages
//! stayed resident after they were freed. A fixed 256 KiB threshold keeps such
//! buffers in their own mappings, returned on free. One arena: each arena keeps its
//! own free fragments, and with two the peak of a 5M-message drain was 59 MB against
//! 52 MB with one (100k messages: 47 against 44 MB), at the same speed; the worker's
//! allocating threads (the pipeline, the poll thread, librdkafka's) rarely contend.
//! (A periodic `malloc_trim` made no measurable difference and was left out.)

/// Sets the allocator up. Call first thing in `main`, before any other thread
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
