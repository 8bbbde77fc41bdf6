//! The first TLS handshake of a process does not pay for CPU jitter entropy.
//!
//! aws-lc, under rustls' `aws_lc_rs` provider, seeds its random generator from
//! CPU jitter by default: about 50 ms of computation in every process, just
//! before the first ClientHello. The workspace builds it to seed from the OS
//! instead (`AWS_LC_SYS_NO_JITTER_ENTROPY` in `.cargo/config.toml`). This
//! checks that the setting reached the build; it times nothing.

#[test]
fn aws_lc_seeds_from_the_os_not_from_cpu_jitter() {
    assert!(
        aws_lc_rs::try_fips_cpu_jitter_entropy().is_err(),
        "aws-lc was built with CPU jitter entropy: build with AWS_LC_SYS_NO_JITTER_ENTROPY=1 \
         (the workspace's .cargo/config.toml sets it)"
    );
}
