//! bd3's launch backends, shared by the `bd3` command line (src/main.rs) and the tests that start
//! multi-process jobs. The trainer itself knows nothing about how it was started: it reads its
//! rank from the environment the backend set up (trainer::dist).

pub mod local;
