//! Where session state lives beyond memory: [`journal`] is the embedded durable log engine (opaque
//! records and snapshots, group commit, recovery, compaction) that the durable store builds on.

pub mod journal;
