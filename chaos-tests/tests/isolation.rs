//! End-to-end tests of isolation: a sandbox has no network and cannot see
//! the host's files or processes.
//!
//! How these tests run and what they need: see `common/mod.rs`.

#[macro_use]
mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use sandfleet_testkit::helpers::{create_running, describe, exec_python, expect_code, small_session, stdout};
use sandfleet_testkit::host::nonce;
use tonic::Code;

use common::{one_node, RemoveOnDrop, SHORT};

/// A Python string literal for `s` (JSON string syntax is valid Python for these inputs).
fn py_str(s: &str) -> String {
    serde_json::to_string(s).expect("strings serialize")
}

fn parse_json_line(out: &sandfleet::ExecOutput) -> serde_json::Value {
    let text = stdout(out);
    let line = text.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| panic!("sandbox script printed no JSON ({e}): {}", describe(out)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_has_no_network() {
    require_facilities!();
    let cluster = one_node().await;
    let client = cluster.client().await;
    let s = create_running(&client, small_session("net")).await.unwrap();

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let port_of = |addr: &str| addr.rsplit(':').next().unwrap().parse::<u16>().unwrap();
    let coordinator_port = port_of(&cluster.coordinators[0].addr);
    let agent_port = port_of(&cluster.agents[0].addr);

    let code = format!(
        r#"
import json, socket
res = {{}}
for name, port in [("listener", {port}), ("coordinator", {coordinator_port}), ("agent", {agent_port})]:
    try:
        c = socket.create_connection(("127.0.0.1", port), timeout=3)
        c.close()
        res[name] = "connected"
    except OSError as e:
        res[name] = "failed: %s" % e
try:
    c = socket.create_connection(("10.255.255.1", 80), timeout=2)
    c.close()
    res["outside"] = "connected"
except OSError as e:
    res["outside"] = "failed: %s" % e
try:
    res["interfaces"] = sorted(n for _, n in socket.if_nameindex())
except OSError:
    res["interfaces"] = []
print(json.dumps(res))
"#
    );
    let out = exec_python(&client, &s, &code, Duration::from_secs(60)).await.unwrap();
    assert_eq!(out.exit.exit_code, 0, "{}", describe(&out));
    let res = parse_json_line(&out);
    for name in ["listener", "coordinator", "agent", "outside"] {
        let r = res[name].as_str().unwrap_or_default();
        assert!(r.starts_with("failed"), "connecting to the host's {name} from the sandbox must fail, got {r:?}");
    }
    let ifaces: Vec<&str> = res["interfaces"].as_array().unwrap().iter().filter_map(|v| v.as_str()).collect();
    assert!(ifaces.iter().all(|i| *i == "lo"), "only loopback may exist in the sandbox, got {ifaces:?}");
    assert!(
        matches!(listener.accept(), Err(ref e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the test's listener received a connection from the sandbox"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_files_are_invisible() {
    require_facilities!();
    let cluster = one_node().await;
    let client = cluster.client().await;
    let s = create_running(&client, small_session("hostfs")).await.unwrap();

    let marker = std::env::temp_dir().join(format!("sandfleet-marker-{}", nonce()));
    std::fs::write(&marker, b"host secret").unwrap();
    let _cleanup = RemoveOnDrop(marker.clone());
    let agent_dir = cluster.agents[0].data_dir.display().to_string();
    let cluster_dir = cluster.dir().display().to_string();
    let marker_s = marker.display().to_string();

    let code = format!(
        r#"
import json, os
def read(p):
    try:
        with open(p, "rb") as f:
            return "read:" + f.read().decode("latin-1")
    except Exception as e:
        return "error:" + type(e).__name__
def ls(p):
    try:
        return sorted(os.listdir(p))
    except Exception as e:
        return "error:" + type(e).__name__
leaks = []
for pid in os.listdir("/proc"):
    if pid.isdigit():
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                argv0 = f.read().split(b"\0")[0].decode("latin-1")
            if argv0.endswith("/sandfleet-" + "agent") or argv0.endswith("/sandfleet-" + "coordinator"):
                leaks.append(argv0)
        except Exception:
            pass
print(json.dumps({{
    "shadow": read("/etc/shadow"),
    "root": ls("/root"),
    "home": ls("/home"),
    "agent_dir": os.path.exists({agent_dir}),
    "cluster_dir": os.path.exists({cluster_dir}),
    "marker": os.path.exists({marker}),
    "marker_read": read({marker}),
    "proc_leaks": leaks,
}}))
"#,
        agent_dir = py_str(&agent_dir),
        cluster_dir = py_str(&cluster_dir),
        marker = py_str(&marker_s),
    );
    let out = exec_python(&client, &s, &code, SHORT).await.unwrap();
    assert_eq!(out.exit.exit_code, 0, "{}", describe(&out));
    let r = parse_json_line(&out);

    if let Ok(host_shadow) = std::fs::read("/etc/shadow") {
        let host = format!("read:{}", host_shadow.iter().map(|b| *b as char).collect::<String>());
        assert_ne!(r["shadow"].as_str(), Some(host.as_str()), "the host's /etc/shadow is readable in the sandbox");
    }
    for dir in ["/root", "/home"] {
        let host: BTreeSet<String> = std::fs::read_dir(dir)
            .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        let key = dir.trim_start_matches('/');
        if let Some(inside) = r[key].as_array() {
            let inside: BTreeSet<String> = inside.iter().filter_map(|v| v.as_str().map(String::from)).collect();
            let shared: Vec<_> = host.intersection(&inside).collect();
            assert!(shared.is_empty(), "host entries of {dir} are visible in the sandbox: {shared:?}");
        }
    }
    assert_eq!(r["agent_dir"], false, "the agent's data dir {agent_dir} exists in the sandbox");
    assert_eq!(r["cluster_dir"], false, "the test's cluster dir {cluster_dir} exists in the sandbox");
    assert_eq!(r["marker"], false, "a host file in {} is visible in the sandbox", std::env::temp_dir().display());
    assert!(r["marker_read"].as_str().unwrap_or_default().starts_with("error:"), "{r}");
    assert_eq!(r["proc_leaks"], serde_json::json!([]), "host processes are visible in the sandbox's /proc");

    // The file API refuses absolute paths outright.
    expect_code("read /etc/shadow", client.read_file_bytes(&s, "/etc/shadow").await, Code::InvalidArgument);
    expect_code("list /root", client.list_files(&s, "/root").await, Code::InvalidArgument);
    expect_code("read agent dir", client.read_file_bytes(&s, &agent_dir).await, Code::InvalidArgument);
}
