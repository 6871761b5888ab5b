//! End-to-end tests of the file API: a 10 MiB file round trips byte for byte.
//!
//! How these tests run and what they need: see `common/mod.rs`.

#[macro_use]
mod common;

use sandfleet_testkit::helpers::{create_running, describe, exec_argv, small_session, stdout};
use sha2::{Digest, Sha256};

use common::{one_node, SHORT};

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_mib_file_round_trips_byte_for_byte() {
    require_facilities!();
    let cluster = one_node().await;
    let client = cluster.client().await;
    let s = create_running(&client, small_session("files")).await.unwrap();

    // Download: 10 MiB made inside the sandbox reads back with the same digest.
    let out =
        exec_argv(&client, &s, ["sh", "-c", "head -c 10485760 /dev/urandom > made.bin && sha256sum made.bin"], SHORT)
            .await
            .unwrap();
    assert_eq!(out.exit.exit_code, 0, "{}", describe(&out));
    let inside = stdout(&out).split_whitespace().next().unwrap_or_default().to_string();
    let back = client.read_file_bytes(&s, "made.bin").await.expect("read 10 MiB");
    assert_eq!(back.len(), 10 << 20, "read back a different length");
    assert_eq!(sha256_hex(&back), inside, "read_file disagrees with sha256sum inside the sandbox");

    // Upload: 10 MiB of random bytes written through the API.
    let mut data = vec![0u8; 10 << 20];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut data);
    let want = sha256_hex(&data);

    client.write_file_bytes(&s, "blob.bin", data.clone()).await.expect("write 10 MiB");
    let back = client.read_file_bytes(&s, "blob.bin").await.expect("read back");
    assert_eq!(back.len(), data.len(), "read back a different length");
    assert_eq!(sha256_hex(&back), want, "read back different bytes");

    let out = exec_argv(&client, &s, ["sha256sum", "blob.bin"], SHORT).await.unwrap();
    assert_eq!(out.exit.exit_code, 0, "{}", describe(&out));
    let inside = stdout(&out).split_whitespace().next().unwrap_or_default().to_string();
    assert_eq!(inside, want, "sha256sum inside the sandbox disagrees: {}", describe(&out));
}
