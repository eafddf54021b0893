//! lrvault: archives Microsoft Defender for Endpoint live-response results as hashed,
//! self-describing evidence packages with a hash-chained chain-of-custody log.

pub mod sim;
