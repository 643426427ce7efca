//! crsync node-server (work in progress).
