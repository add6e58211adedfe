//! The process's memory allocator (glibc): settings made at start.
//!
//! Left alone, glibc made the worker's memory grow with the length of a backlog
//! (1M messages: 104 MB peak, against 64 MB for 100k). Every thread got its own
//! arena, and the mmap threshold adapted upwards, so large short-lived buffers (fetch
//! buffers, a batch's statement parameters) landed in the arenas and their pages
//! stayed resident after they were freed. Two arenas and a fixed 256 KiB threshold
//! keep such buffers in their own mappings, returned on free. (A periodic
//! `malloc_trim` on top of this made no measurable difference and was left out.)

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
                libc::mallopt(libc::M_ARENA_MAX, 2);
            }
            if !set("MALLOC_MMAP_THRESHOLD_") {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
            }
        }
    }
}
