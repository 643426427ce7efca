//! Transports for crsync (work in progress).
