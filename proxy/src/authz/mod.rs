//! Compiled authorization (being written).
