//! Operations that wait in a host's `flotilla.ops` tube while the desired state moves on:
//! each one is checked against the newest desired state and the VM's marker just before
//! it runs (issue 14).

use std::collections::BTreeMap;
use std::time::Duration;

use flotilla::actual::RunState;
use flotilla::message::{self, tubes, Message};
use flotilla_e2e::{vm_yaml, Cluster, HostSpec, Options};

const CONVERGE: Duration = Duration::from_secs(60);

/// Runs one beanstalkd command against host `i`'s server.
fn on_beanstalkd<T>(
    c: &Cluster,
    i: usize,
    f: impl AsyncFnOnce(&mut beanstalk::Client) -> Result<T, beanstalk::Error>,
) -> T {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut client = beanstalk::Client::connect(c.hosts[i].beanstalkd.addr())
            .await
            .expect("connect to beanstalkd");
        f(&mut client).await.expect("beanstalkd command")
    })
}

/// The desired commit of host `i`'s last finished reconcile pass, from its published
/// inventory: once it names a commit, the agent's newest snapshot is at least that one.
fn reconciled_commit(c: &Cluster, i: usize) -> Option<String> {
    let job = on_beanstalkd(c, i, async |b| {
        b.use_tube(tubes::INVENTORY).await?;
        b.peek_ready().await
    })?;
    match message::decode(&job.body).ok()?.body {
        Message::Inventory(inv) => inv.commit,
        _ => None,
    }
}

/// Guards issue 14, case 1: six VM files deleted and the deletion reverted a moment
/// later, while the six destroys still wait in the ops tube. The host took the revert at
/// once, yet the queued destroys ran afterwards and every VM was rebuilt empty. Now a
/// queued op is checked against the newest desired state just before it runs, and a
/// destroy of a VM that is desired again is dropped. The ops tube is paused so the
/// destroys provably wait until the revert has been reconciled.
#[test]
fn a_revert_drops_the_destroys_still_queued() {
    let mut c = Cluster::start(&[HostSpec::new("host1", None)], Options::default());
    c.start_agents();
    let names: Vec<String> = (1..=6).map(|i| format!("db{i}")).collect();
    let files: Vec<(String, String)> = names
        .iter()
        .chain(std::iter::once(&"keeper".to_string()))
        .map(|n| (format!("vms/{n}.yaml"), vm_yaml(n, "CS0", "")))
        .collect();
    let refs: Vec<(&str, Option<&str>)> = files
        .iter()
        .map(|(p, t)| (p.as_str(), Some(t.as_str())))
        .collect();
    c.commit(&refs, "seven VMs");
    c.wait_until("seven VMs running and complete", CONVERGE, |c| {
        let vms = c.vms(0);
        vms.len() == 7
            && vms.iter().all(|v| {
                v.state == RunState::Running && v.marker.as_ref().is_some_and(|m| m.complete)
            })
    });
    let built: BTreeMap<String, String> = c
        .vms(0)
        .into_iter()
        .map(|v| (v.name, v.marker.expect("marker").job_id))
        .collect();

    // Nothing is taken from the ops tube until it is unpaused.
    on_beanstalkd(&c, 0, async |b| b.pause_tube(tubes::OPS, 3600).await);
    let deleted: Vec<(&str, Option<&str>)> =
        files[..6].iter().map(|(p, _)| (p.as_str(), None)).collect();
    c.commit(&deleted, "six VM files deleted by mistake");
    c.wait_until("six destroys queued", CONVERGE, |c| {
        c.tube_stats(0, tubes::OPS)
            .is_some_and(|s| s.current_jobs_ready == 6)
    });
    let revert = c.commit(&refs[..6], "revert");
    c.wait_until("the revert reconciled", CONVERGE, |c| {
        reconciled_commit(c, 0).as_deref() == Some(revert.as_str())
    });
    on_beanstalkd(&c, 0, async |b| b.pause_tube(tubes::OPS, 0).await);
    c.wait_until("the six destroys answered", CONVERGE, |c| {
        c.events(0)
            .iter()
            .filter(|e| e.kind == "result" && e.message.starts_with("destroy "))
            .count()
            == 6
    });
    let results: Vec<String> = c
        .events(0)
        .into_iter()
        .filter(|e| e.kind == "result")
        .map(|e| e.message)
        .collect();
    let now: BTreeMap<String, String> = c
        .vms(0)
        .into_iter()
        .filter_map(|v| Some((v.name, v.marker?.job_id)))
        .collect();
    assert_eq!(
        now,
        built,
        "every VM is still the one first built: {results:#?}\n{}",
        c.logs()
    );
    for r in results.iter().filter(|r| r.starts_with("destroy ")) {
        assert!(r.contains("dropped"), "{r}");
    }
    assert_eq!(
        c.tube_stats(0, tubes::OPS).map(|s| s.current_jobs_buried),
        Some(0)
    );
}
