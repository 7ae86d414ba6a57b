//! Locks that stay usable after a panic.
//!
//! vstor's shared state is kept consistent step by step (each update is a plain assignment or a
//! whole-value replace), so a thread that panicked while holding a lock leaves nothing half done.
//! Refusing every later caller would turn one panic into a dead disk; taking the value as it is
//! keeps the others serving.

use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Locks `m`, ignoring poison.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Read-locks `l`, ignoring poison.
pub fn read<T: ?Sized>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Write-locks `l`, ignoring poison.
pub fn write<T: ?Sized>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poisoned_lock_still_gives_its_value() {
        let m = std::sync::Arc::new(Mutex::new(7));
        let held = m.clone();
        let _ = std::thread::spawn(move || {
            let _g = held.lock();
            std::panic::panic_any("poison it");
        })
        .join();
        assert!(m.is_poisoned());
        *lock(&m) += 1;
        assert_eq!(*lock(&m), 8);

        let l = std::sync::Arc::new(RwLock::new(1));
        let held = l.clone();
        let _ = std::thread::spawn(move || {
            let _g = held.write();
            std::panic::panic_any("poison it");
        })
        .join();
        assert!(l.is_poisoned());
        *write(&l) += 1;
        assert_eq!(*read(&l), 2);
    }
}
