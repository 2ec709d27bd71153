//! vectors tests (to be written)
