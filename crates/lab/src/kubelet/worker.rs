//! One task per pod: creates its sandbox (or adopts it from the pod record),
//! supervises its container processes and readiness probes, posts its
//! status, and on deletion stops it and removes everything.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Pod};
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use nix::sys::signal::Signal;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::context::{Ctx, MAX_GRACE, POD_TICK, RESTART_BACKOFF_BASE, RESTART_BACKOFF_MAX};
use crate::image::{self, Program};
use crate::probe::Readiness;
use crate::record::{self, ContainerRecord, PodRecord};
use crate::runtime::{self, PodRef, Proc};
use crate::status::{Condition, now};

/// The watch feeds each worker the latest Pod; `None` once the object is
/// gone from the API.
pub type PodFeed = watch::Receiver<Option<Pod>>;

#[derive(Debug)]
struct Ctr {
    spec: Container,
    program: Result<Program, String>,
    proc: Option<Proc>,
    restart_count: i32,
    started_at: Option<Value>,
    /// (exit code, finishedAt) of the previous run.
    last_exit: Option<(i32, Value)>,
    next_start: Instant,
    /// Exited and not to be restarted (restartPolicy Never/OnFailure).
    finished: bool,
    readiness: Option<Readiness>,
}

#[derive(Debug)]
struct Worker {
    ctx: Arc<Ctx>,
    pod: Pod,
    pref: PodRef,
    cgroup: PathBuf,
    ips: Vec<String>,
    ctrs: Vec<Ctr>,
    start_time: Value,
    conditions: [Condition; 4],
    terminating: bool,
    posted: Value,
}

fn pod_ref(ctx: &Ctx, pod: &Pod) -> PodRef {
    let namespace = pod
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let name = pod.metadata.name.clone().unwrap_or_default();
    PodRef {
        uid: pod.metadata.uid.clone().unwrap_or_default(),
        netns: runtime::netns_name(&ctx.lab, ctx.index, &namespace, &name),
        namespace,
        name,
    }
}

/// Runs one pod from first sight to its deletion.
pub async fn run(ctx: Arc<Ctx>, mut feed: PodFeed) {
    let Some(pod) = feed.borrow().clone() else {
        return;
    };
    let pref = pod_ref(&ctx, &pod);
    let cgroup = ctx.node_cgroup.join(&pref.uid);
    let mut w = Worker {
        ctrs: Vec::new(),
        start_time: now(),
        conditions: [
            Condition::new("PodScheduled"),
            Condition::new("Initialized"),
            Condition::new("ContainersReady"),
            Condition::new("Ready"),
        ],
        terminating: false,
        posted: Value::Null,
        ips: Vec::new(),
        ctx,
        pod,
        pref,
        cgroup,
    };
    w.conditions[0].set(true);
    let in_api = loop {
        if w.pod.metadata.deletion_timestamp.is_some() {
            break true;
        }
        if w.ctrs.is_empty() && !w.start().await {
            // Sandbox failed; try again unless the pod changes meanwhile.
            tokio::select! {
                r = feed.changed() => if r.is_err() { break false; },
                () = tokio::time::sleep(Duration::from_secs(2)) => {}
            }
        } else {
            w.supervise().await;
            w.post().await;
            tokio::select! {
                r = feed.changed() => if r.is_err() { break false; },
                () = tokio::time::sleep(POD_TICK) => {}
            }
        }
        match feed.borrow_and_update().clone() {
            Some(p) => w.pod = p,
            None => break false,
        }
    };
    w.terminate(in_api).await;
}

/// Removes a pod the API no longer has but a record (from before a kubelet
/// restart) still describes.
pub async fn clean_orphan(ctx: Arc<Ctx>, rec: PodRecord) {
    tracing::info!(pod = %format!("{}/{}", rec.namespace, rec.name), uid = %rec.uid, "removing pod that is gone from the API");
    let pref = PodRef {
        uid: rec.uid.clone(),
        namespace: rec.namespace,
        name: rec.name,
        netns: rec.netns,
    };
    let ctx2 = ctx.clone();
    let res =
        tokio::task::spawn_blocking(move || runtime::destroy_sandbox(&ctx2, &pref, &rec.cgroup))
            .await;
    match res {
        Ok(Ok(())) => record::remove(&ctx, &rec.uid),
        Ok(Err(e)) => tracing::warn!(error = %format!("{e:#}"), "removing orphaned pod"),
        Err(e) => tracing::warn!(error = %e, "removing orphaned pod"),
    }
}

impl Worker {
    fn name(&self) -> String {
        format!("{}/{}", self.pref.namespace, self.pref.name)
    }

    fn restart_policy(&self) -> &str {
        self.pod
            .spec
            .as_ref()
            .and_then(|s| s.restart_policy.as_deref())
            .unwrap_or("Always")
    }

    /// Creates (or adopts) the sandbox and sets up the containers. False when
    /// the sandbox could not be made (the status says why).
    async fn start(&mut self) -> bool {
        let rec = record::load(&self.ctx, &self.pref.uid)
            .filter(|r| runtime::netns_path(&r.netns).exists() && r.cgroup.exists());
        let adopted = rec.is_some();
        let ips = if let Some(r) = &rec {
            tracing::info!(pod = %self.name(), ips = ?r.ips, "adopting running pod from its record");
            r.ips.clone()
        } else {
            let (ctx, pref, cg) = (self.ctx.clone(), self.pref.clone(), self.cgroup.clone());
            let made =
                tokio::task::spawn_blocking(move || runtime::create_sandbox(&ctx, &pref, &cg))
                    .await;
            match made {
                Ok(Ok(ips)) => ips,
                Ok(Err(e)) => {
                    self.sandbox_failed(&format!("{e:#}")).await;
                    return false;
                }
                Err(e) => {
                    self.sandbox_failed(&e.to_string()).await;
                    return false;
                }
            }
        };
        tracing::info!(pod = %self.name(), ?ips, netns = %self.pref.netns, "sandbox ready");
        self.ips = ips;
        let specs = self
            .pod
            .spec
            .as_ref()
            .map(|s| s.containers.clone())
            .unwrap_or_default();
        for spec in specs {
            let mut c = Ctr {
                program: image::resolve(&self.ctx, &spec),
                proc: None,
                restart_count: 0,
                started_at: None,
                last_exit: None,
                next_start: Instant::now(),
                finished: false,
                readiness: None,
                spec,
            };
            if let Some(r) = rec.as_ref().and_then(|r| r.containers.get(&c.spec.name)) {
                c.restart_count = r.restart_count;
                if let Some(pid) = r.pid {
                    c.proc = Some(Proc::Adopted {
                        pid,
                        cgroup: self.cgroup.clone(),
                    });
                    c.started_at = r.started_at.clone();
                    c.readiness = Readiness::new(&c.spec);
                }
            }
            self.ctrs.push(c);
        }
        if !adopted {
            self.save();
        }
        true
    }

    async fn sandbox_failed(&mut self, why: &str) {
        tracing::warn!(pod = %self.name(), error = %why, "creating the pod sandbox failed");
        let status = json!({"status": {
            "phase": "Pending",
            "hostIP": self.ctx.ipv4.to_string(),
            "conditions": [self.conditions[0].json(), {
                "type": "Ready", "status": "False",
                "reason": "SandboxCreationFailed", "message": why,
            }],
        }});
        self.patch(status).await;
    }

    fn save(&self) {
        let rec = PodRecord {
            uid: self.pref.uid.clone(),
            namespace: self.pref.namespace.clone(),
            name: self.pref.name.clone(),
            netns: self.pref.netns.clone(),
            cgroup: self.cgroup.clone(),
            ips: self.ips.clone(),
            containers: self
                .ctrs
                .iter()
                .map(|c| {
                    (
                        c.spec.name.clone(),
                        ContainerRecord {
                            pid: c.proc.as_ref().map(Proc::pid),
                            restart_count: c.restart_count,
                            started_at: c.started_at.clone(),
                        },
                    )
                })
                .collect(),
        };
        if let Err(e) = record::save(&self.ctx, &rec) {
            tracing::warn!(pod = %self.name(), error = %e, "writing pod record");
        }
    }

    /// Reaps, restarts and starts processes, and runs due probes.
    async fn supervise(&mut self) {
        let policy = self.restart_policy().to_owned();
        let mut changed = false;
        let pod_ip = self.ips.first().cloned().unwrap_or_default();
        let host_ip = self.ctx.ipv4.to_string();
        let log_dir = self.ctx.state_dir.join("logs");
        for c in &mut self.ctrs {
            if let Some(code) = c.proc.as_mut().and_then(Proc::exited) {
                c.proc = None;
                c.readiness = None;
                c.last_exit = Some((code, now()));
                c.started_at = None;
                let restart = match policy.as_str() {
                    "Never" => false,
                    "OnFailure" => code != 0,
                    _ => true,
                };
                if restart {
                    let factor = 1u32 << c.restart_count.clamp(0, 5);
                    let delay = (RESTART_BACKOFF_BASE * factor).min(RESTART_BACKOFF_MAX);
                    c.next_start = Instant::now() + delay;
                    c.restart_count += 1;
                    tracing::info!(container = %c.spec.name, code, ?delay, "container exited; restarting after backoff");
                } else {
                    c.finished = true;
                    tracing::info!(container = %c.spec.name, code, "container exited");
                }
                changed = true;
            }
            if c.proc.is_none() && !c.finished && Instant::now() >= c.next_start {
                let Ok(program) = &c.program else { continue };
                let env = image::env(&self.pod, &c.spec, &pod_ip, &host_ip);
                let log = log_dir.join(format!("{}_{}.log", self.pref.uid, c.spec.name));
                match runtime::spawn(&self.pref.netns, &self.cgroup, &log, program, &env) {
                    Ok(child) => {
                        tracing::info!(container = %c.spec.name, pid = child.id(), "container started");
                        c.proc = Some(Proc::Child(child));
                        c.started_at = Some(now());
                        c.readiness = Readiness::new(&c.spec);
                    }
                    Err(e) => {
                        tracing::warn!(container = %c.spec.name, error = %format!("{e:#}"), "starting container");
                        c.next_start = Instant::now() + RESTART_BACKOFF_MAX;
                    }
                }
                changed = true;
            }
            if c.proc.is_some()
                && let Some(r) = &mut c.readiness
            {
                r.check(&pod_ip).await;
            }
        }
        if changed {
            self.save();
        }
    }

    fn ctr_ready(c: &Ctr) -> bool {
        c.proc.is_some() && c.readiness.as_ref().is_none_or(Readiness::ready)
    }

    fn status(&mut self) -> Value {
        let all_ready =
            !self.terminating && !self.ctrs.is_empty() && self.ctrs.iter().all(Self::ctr_ready);
        self.conditions[1].set(true);
        self.conditions[2].set(all_ready);
        self.conditions[3].set(all_ready);
        let phase = if self.ctrs.iter().all(|c| c.finished) && !self.ctrs.is_empty() {
            if self
                .ctrs
                .iter()
                .all(|c| c.last_exit.as_ref().is_some_and(|e| e.0 == 0))
            {
                "Succeeded"
            } else {
                "Failed"
            }
        } else if self.ctrs.iter().any(|c| c.program.is_err())
            || self
                .ctrs
                .iter()
                .all(|c| c.proc.is_none() && c.restart_count == 0 && !c.finished)
        {
            "Pending"
        } else {
            "Running"
        };
        let statuses: Vec<Value> = self
            .ctrs
            .iter()
            .map(|c| {
                let state = match (&c.proc, &c.program) {
                    (_, Err(msg)) => json!({"waiting": {"reason": "ErrImagePull", "message": msg}}),
                    (Some(_), _) => json!({"running": {"startedAt": c.started_at}}),
                    (None, _) if c.finished => {
                        let (code, at) = c.last_exit.clone().unwrap_or((-1, now()));
                        json!({"terminated": {"exitCode": code, "reason": if code == 0 {"Completed"} else {"Error"}, "finishedAt": at}})
                    }
                    (None, _) if c.restart_count > 0 => json!({"waiting": {"reason": "CrashLoopBackOff", "message": format!("back-off restarting container {}", c.spec.name)}}),
                    (None, _) => json!({"waiting": {"reason": "ContainerCreating"}}),
                };
                let last = match &c.last_exit {
                    Some((code, at)) if !c.finished => json!({"terminated": {"exitCode": code, "reason": if *code == 0 {"Completed"} else {"Error"}, "finishedAt": at}}),
                    _ => json!({}),
                };
                json!({
                    "name": c.spec.name,
                    "image": c.spec.image,
                    "imageID": "",
                    "containerID": c.proc.as_ref().map(|p| format!("meshless-lab://{}", p.pid())),
                    "ready": !self.terminating && Self::ctr_ready(c),
                    "started": c.proc.is_some(),
                    "restartCount": c.restart_count,
                    "state": state,
                    "lastState": last,
                })
            })
            .collect();
        let host_ips = [self.ctx.ipv4.to_string(), self.ctx.ipv6.to_string()];
        json!({"status": {
            "phase": phase,
            "hostIP": host_ips[0],
            "hostIPs": host_ips.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>(),
            "podIP": self.ips.first(),
            "podIPs": self.ips.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>(),
            "startTime": self.start_time,
            "conditions": self.conditions.iter().map(Condition::json).collect::<Vec<_>>(),
            "containerStatuses": statuses,
        }})
    }

    /// Posts the status if it differs from what was last posted.
    async fn post(&mut self) {
        let status = self.status();
        if status != self.posted && self.patch(status.clone()).await {
            self.posted = status;
        }
    }

    async fn patch(&self, status: Value) -> bool {
        let api: Api<Pod> = Api::namespaced(self.ctx.client.clone(), &self.pref.namespace);
        match api
            .patch_status(
                &self.pref.name,
                &PatchParams::default(),
                &Patch::Merge(status),
            )
            .await
        {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(pod = %self.name(), error = %e, "updating pod status");
                false
            }
        }
    }

    fn grace(&self) -> Duration {
        let secs = self
            .pod
            .metadata
            .deletion_grace_period_seconds
            .or_else(|| {
                self.pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.termination_grace_period_seconds)
            })
            .unwrap_or(30);
        Duration::from_secs(u64::try_from(secs).unwrap_or(0)).min(MAX_GRACE)
    }

    /// Not ready at once, SIGTERM, SIGKILL after the grace period, CNI DEL,
    /// netns and cgroup removed, then (if the API still has it) the Pod
    /// deleted with grace period 0.
    async fn terminate(&mut self, in_api: bool) {
        let started = std::time::Instant::now();
        self.terminating = true;
        if in_api && !self.ctrs.is_empty() {
            self.post().await;
        }
        let grace = self.grace();
        for c in &self.ctrs {
            if let Some(p) = &c.proc {
                p.signal(Signal::SIGTERM);
            }
        }
        let deadline = Instant::now() + grace;
        loop {
            let running = self
                .ctrs
                .iter_mut()
                .filter_map(|c| c.proc.as_mut())
                .map(|p| usize::from(p.exited().is_none()))
                .sum::<usize>();
            if running == 0 {
                break;
            }
            if Instant::now() >= deadline {
                for c in &self.ctrs {
                    if let Some(p) = &c.proc {
                        p.signal(Signal::SIGKILL);
                    }
                }
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (ctx, pref, cg) = (self.ctx.clone(), self.pref.clone(), self.cgroup.clone());
        let mut attempt = 0;
        loop {
            let (ctx, pref, cg) = (ctx.clone(), pref.clone(), cg.clone());
            match tokio::task::spawn_blocking(move || runtime::destroy_sandbox(&ctx, &pref, &cg))
                .await
            {
                Ok(Ok(())) => break,
                Ok(Err(e)) if attempt < 5 => {
                    tracing::warn!(pod = %self.name(), error = %format!("{e:#}"), "removing sandbox; retrying");
                }
                Ok(Err(e)) => {
                    tracing::error!(pod = %self.name(), error = %format!("{e:#}"), "removing sandbox failed");
                    break;
                }
                Err(e) => {
                    tracing::error!(pod = %self.name(), error = %e, "removing sandbox failed");
                    break;
                }
            }
            attempt += 1;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        record::remove(&self.ctx, &self.pref.uid);
        // Reap our children so they do not linger as zombies.
        for c in &mut self.ctrs {
            if let Some(Proc::Child(child)) = &mut c.proc {
                let _ignored = child.try_wait();
            }
        }
        if in_api {
            let api: Api<Pod> = Api::namespaced(self.ctx.client.clone(), &self.pref.namespace);
            let dp = DeleteParams {
                grace_period_seconds: Some(0),
                preconditions: Some(Preconditions {
                    uid: Some(self.pref.uid.clone()),
                    resource_version: None,
                }),
                ..DeleteParams::default()
            };
            match api.delete(&self.pref.name, &dp).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
                Err(e) => tracing::warn!(pod = %self.name(), error = %e, "deleting pod"),
            }
        }
        tracing::info!(pod = %self.name(), took = ?started.elapsed(), "pod stopped and removed");
    }
}
