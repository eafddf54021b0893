//! Issue 21, the clouds: `status` shows each tenant's cloud, its sign-in method and the hosts
//! in force, the cloud's preset for every key the tenant leaves out.

use lrvault_sim::SimConfig;

use crate::common::env;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_each_tenants_cloud_and_the_hosts_in_force() {
    let e = env(SimConfig::default(), "").await;
    // The simulator's tenant, moved to GCC High with its own API and sign-in hosts kept: the
    // preset fills scope and download_hosts.
    let text = std::fs::read_to_string(&e.config_path).unwrap();
    let base = e.sim.base_url();
    let hosts = text
        .lines()
        .find(|l| l.starts_with("download_hosts"))
        .unwrap()
        .to_string();
    let moved = text.replace(&hosts, "cloud = \"gcc-high\"");
    std::fs::write(&e.config_path, moved).unwrap();
    let (json, _) = e.run_ok(&["status", "--format", "json"]);
    let status: serde_json::Value = serde_json::from_str(&json).unwrap();
    let base = base.trim_end_matches('/');
    assert_eq!(
        status["tenants"],
        serde_json::json!([{
            "tenant": "sim0",
            "cloud": "gcc-high",
            "auth": "secret",
            "login_base": format!("{base}/"),
            "api_base": format!("{base}/"),
            "download_hosts": "*.blob.core.usgovcloudapi.net *.securitycenter.windows.us *.securitycenter.microsoft.us",
        }])
    );
    let (table, _) = e.run_ok(&["status"]);
    let tenants = table.split("Tenants:\n").nth(1).unwrap();
    let row = tenants.lines().nth(2).unwrap();
    assert_eq!(
        row.split_whitespace().collect::<Vec<_>>(),
        [
            "sim0",
            "gcc-high",
            "secret",
            &format!("{base}/"),
            &format!("{base}/"),
            "*.blob.core.usgovcloudapi.net",
            "*.securitycenter.windows.us",
            "*.securitycenter.microsoft.us"
        ]
    );
}
