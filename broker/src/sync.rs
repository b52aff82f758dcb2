//! Locking shared state.

use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Lock `m`, recovering the data if a holder panicked.
///
/// Every user keeps its critical sections consistent (each update is a single insert, remove or
/// assignment), so the data a panicking holder left behind is still valid and a poisoned lock
/// must not take the whole process down with it.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Read-lock `l`, recovering the data if a writer panicked (see [`lock`]).
pub fn read<T: ?Sized>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(PoisonError::into_inner)
}

/// Write-lock `l`, recovering the data if a holder panicked (see [`lock`]).
pub fn write<T: ?Sized>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn locks_a_healthy_mutex() {
        let m = Mutex::new(1);
        *lock(&m) += 1;
        assert_eq!(*lock(&m), 2);
    }

    #[test]
    fn recovers_the_data_of_a_poisoned_mutex() {
        let m = Arc::new(Mutex::new(vec![1]));
        let held = Arc::clone(&m);
        let panicked = std::thread::spawn(move || {
            let mut g = held.lock().unwrap();
            g.push(2);
            panic!("poison the lock");
        })
        .join();
        assert!(panicked.is_err());
        assert!(m.is_poisoned());
        assert_eq!(*lock(&m), vec![1, 2]);
    }

    #[test]
    fn recovers_the_data_of_a_poisoned_rwlock() {
        let l = Arc::new(RwLock::new(1));
        let held = Arc::clone(&l);
        let panicked = std::thread::spawn(move || {
            let mut g = held.write().unwrap();
            *g = 2;
            panic!("poison the lock");
        })
        .join();
        assert!(panicked.is_err());
        assert!(l.is_poisoned());
        assert_eq!(*read(&l), 2);
        *write(&l) = 3;
        assert_eq!(*read(&l), 3);
    }
}
