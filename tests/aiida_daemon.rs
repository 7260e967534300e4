//! A live AiiDA on kiwimq's broker: a `verdi presto --use-zeromq` profile (`core.sqlite_dos`,
//! no PostgreSQL, no RabbitMQ) whose daemon finds `kiwimq broker` serving its service
//! directory and uses it instead of starting AiiDA's own. Workflows and calculations are
//! submitted with AiiDA, controlled with kiwimq (status, pause, play, kill), their state
//! broadcasts heard by kiwimq; then the broker is killed mid-run with `kill -9` and started
//! again, and everything finishes without `verdi daemon restart`; with the daemon stopped,
//! `verdi process repair` reads kiwimq's storage and finds it consistent.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::aiida::{AiidaProfile, BrokerProcess};
use common::{SOON, count, eventually, retry, seen};
use kiwimq::{Broadcast, BroadcastFilter, Communicator, Settings};
use serde_json::{Value, json};

/// Calls process `pk` over RPC as plumpy's `RemoteProcessThreadController` does.
async fn control(comm: &Communicator, pk: u64, body: Value) -> kiwimq::Result<Value> {
    comm.rpc_send::<_, Value>(&pk.to_string(), &body)
        .await?
        .await
}

/// The status of process `pk`, once it answers (it does from when a worker runs it).
async fn status(comm: &Communicator, pk: u64) -> Value {
    let what = format!("process {pk} answering a status call");
    retry(Duration::from_secs(60), &what, || {
        control(comm, pk, json!({"intent": "status", "message": null}))
    })
    .await
}

fn pks(submitted: &Value, which: &str) -> Vec<u64> {
    submitted[which]
        .as_array()
        .unwrap()
        .iter()
        .map(|pk| pk.as_u64().unwrap())
        .collect()
}

/// `[pk, state, exit status]` of each process, once all are terminated.
async fn wait_terminated(profile: &AiidaProfile, pks: &[u64]) -> Vec<(u64, String, Value)> {
    let mut args = vec!["180".to_owned()];
    args.extend(pks.iter().map(u64::to_string));
    let states = profile.script("wait", &args).await;
    states
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s[0].as_u64().unwrap(),
                s[1].as_str().unwrap_or("").to_owned(),
                s[2].clone(),
            )
        })
        .collect()
}

#[actix_rt::test]
async fn a_live_aiida_daemon_runs_on_kiwimqs_broker_through_a_kill_9() {
    let profile = AiidaProfile::create().await;
    let service_dir = profile.service_dir().await;
    let mut broker = BrokerProcess::kiwimq_at(service_dir.clone(), 5).await;
    profile
        .verdi(&["-p", &profile.name, "daemon", "start", "1"])
        .await;
    let verdi_status = profile.verdi(&["-p", &profile.name, "status"]).await;
    assert!(
        verdi_status.contains(&format!("Broker PID {}", broker.pid())),
        "the daemon does not use kiwimq's broker: {verdi_status}"
    );

    let comm = Settings::new(format!("zmq://{}", service_dir.display()))
        .with_rpc_timeout(Some(Duration::from_secs(10)))
        .connect()
        .await
        .unwrap();
    let heard = seen::<(u64, String)>();
    let record = heard.clone();
    comm.add_broadcast_subscriber(
        BroadcastFilter::new().subject("state_changed.*"),
        move |broadcast: Broadcast<Value>| {
            let record = record.clone();
            async move {
                let sender = broadcast.sender.as_ref().and_then(|s| s.as_u64());
                let subject = broadcast.subject.as_ref().and_then(|s| s.as_str());
                if let (Some(sender), Some(subject)) = (sender, subject) {
                    record.lock().unwrap().push((sender, subject.to_owned()));
                }
                Ok(())
            }
        },
    )
    .await
    .unwrap();

    // Two of AiiDA's workflows, and two whose calculation sleeps 15 s.
    let submitted = profile
        .script("submit", &["2".to_owned(), "15".to_owned()])
        .await;
    let workflows = pks(&submitted, "workflows");
    let sleepy = pks(&submitted, "sleepy");
    let (paused, killed) = (sleepy[0], sleepy[1]);

    // Control them with kiwimq, while they wait for their calculations.
    let before = status(&comm, paused).await;
    assert_eq!(before["paused"], false, "{before}");
    assert!(
        before["process_string"]
            .as_str()
            .unwrap()
            .contains("SleepyAdd"),
        "{before}"
    );
    let pause = json!({"intent": "pause", "message": "paused by kiwimq"});
    assert_eq!(control(&comm, paused, pause).await.unwrap(), true);
    assert_eq!(status(&comm, paused).await["paused"], true);
    let play = json!({"intent": "play", "message": null});
    assert_eq!(control(&comm, paused, play).await.unwrap(), true);
    assert_eq!(status(&comm, paused).await["paused"], false);
    status(&comm, killed).await;
    let kill = json!({"intent": "kill", "message": "killed by kiwimq", "force_kill": false});
    assert_eq!(control(&comm, killed, kill).await.unwrap(), true);

    // The broker dies mid-run and is started again, as a supervisor would.
    broker.kill().await;
    let at_kill = broker.stored_tasks();
    broker.restart().await;
    // kiwimq's client and AiiDA's daemon both go on by themselves: the process still
    // running answers over the restarted broker.
    eventually(SOON, "kiwimq reconnected", || comm.is_connected()).await;
    let after = status(&comm, paused).await;
    assert_eq!(after["paused"], false, "{after}");

    let mut all = workflows.clone();
    all.extend(&sleepy);
    let states = wait_terminated(&profile, &all).await;
    for (pk, state, exit_status) in &states {
        if *pk == killed {
            assert_eq!(state, "killed", "process {pk}");
        } else {
            assert_eq!(
                (state.as_str(), exit_status),
                ("finished", &json!(0)),
                "process {pk}"
            );
        }
    }
    // A workflow submitted after the restart runs too.
    let later = profile
        .script("submit", &["1".to_owned(), "0".to_owned()])
        .await;
    let later_pks: Vec<u64> = pks(&later, "workflows")
        .into_iter()
        .chain(pks(&later, "sleepy"))
        .collect();
    for (pk, state, exit_status) in wait_terminated(&profile, &later_pks).await {
        assert_eq!(
            (state.as_str(), &exit_status),
            ("finished", &json!(0)),
            "process {pk}"
        );
    }

    // The daemon stopped mid-run, as `verdi process repair` wants it, with kiwimq's broker
    // serving on: AiiDA's repair reads the broker's storage (and moves its processing/ back
    // to pending/, as AiiDA's broker does at its start) and finds a task for each active
    // process. Started again, the daemon's new worker gets the old one's tasks once the
    // broker's grace (5 s here) is over, and runs them to their end.
    let long = profile
        .script("submit", &["1".to_owned(), "15".to_owned()])
        .await;
    let long_pks: Vec<u64> = pks(&long, "workflows")
        .into_iter()
        .chain(pks(&long, "sleepy"))
        .collect();
    let sleepy_pk = pks(&long, "sleepy")[0];
    status(&comm, sleepy_pk).await;
    profile
        .verdi(&["-p", &profile.name, "daemon", "stop"])
        .await;
    let repair = retry(
        Duration::from_secs(30),
        "verdi process repair finding kiwimq's storage consistent",
        || async {
            let (_, repair) = profile
                .try_verdi(&["-p", &profile.name, "process", "repair", "--dry-run"])
                .await;
            if repair.contains("No inconsistencies detected") {
                Ok(repair)
            } else {
                Err(repair)
            }
        },
    )
    .await;
    // …while a process was active: its task is what repair found.
    let now = profile
        .script("wait", &["0".to_owned(), sleepy_pk.to_string()])
        .await;
    assert_eq!(now[0][1], "waiting", "{now}; repair said: {repair}");
    assert_ne!(broker.stored_tasks(), (0, 0));
    profile
        .verdi(&["-p", &profile.name, "daemon", "start", "1"])
        .await;
    for (pk, state, exit_status) in wait_terminated(&profile, &long_pks).await {
        assert_eq!(
            (state.as_str(), &exit_status),
            ("finished", &json!(0)),
            "process {pk}"
        );
    }

    // The state broadcasts came through kiwimq: every workflow's end among them.
    eventually(SOON, "the workflows' finished broadcasts", || {
        let heard = heard.lock().unwrap();
        workflows.iter().all(|pk| {
            heard
                .iter()
                .any(|(sender, subject)| sender == pk && subject.ends_with(".finished"))
        })
    })
    .await;
    let senders: HashSet<u64> = heard.lock().unwrap().iter().map(|(s, _)| *s).collect();
    eventually(SOON, "the broker's storage empty", || {
        broker.stored_tasks() == (0, 0)
    })
    .await;
    println!(
        "live AiiDA on kiwimq's broker: {} processes, {at_kill:?} (pending, processing) tasks \
         on disk at the kill -9, all terminated as asked without a daemon restart; {} state \
         broadcasts heard from {} processes",
        states.len() + later_pks.len() + long_pks.len(),
        count(&heard),
        senders.len()
    );
    comm.close().await.unwrap();
    profile
        .verdi(&["-p", &profile.name, "daemon", "stop"])
        .await;
}
