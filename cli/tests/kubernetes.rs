//! deploy/k8s without a cluster: every overlay renders with `kubectl kustomize` and passes
//! `kubernetes-validate --strict` for the oldest Kubernetes we support (1.29) and the newest
//! bundled; the rendered objects keep the job's invariants; and the trainer pod's command,
//! run here with the environment the manifests give it, joins a job, trains and stops
//! cleanly on SIGTERM.

mod common;

use common::job::*;
use common::*;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const OVERLAYS: [&str; 3] = ["cpu", "gpu", "gpu-bucket"];
/// The oldest Kubernetes the manifests are for: Jobs' `podReplacementPolicy` is on by
/// default from 1.29 (and `podFailurePolicy`, gRPC probes, the pod-index label before it).
const OLDEST: &str = "1.29.0";
const NEWEST: &str = "1.37.0";

fn k8s_dir() -> std::path::PathBuf {
    repo_root().join("deploy/k8s")
}

fn render(overlay: &str) -> String {
    let out = Command::new("kubectl")
        .args([
            "kustomize",
            k8s_dir().join("overlays").join(overlay).to_str().unwrap(),
        ])
        .output()
        .expect("kubectl (with Kustomize) is on PATH: scripts/bootstrap checks it");
    assert!(
        out.status.success(),
        "kubectl kustomize {overlay}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn validate(yaml: &str, version: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rendered.yaml");
    std::fs::write(&file, yaml).unwrap();
    let tool = python_path().with_file_name("kubernetes-validate");
    let out = Command::new(&tool)
        .args(["--strict", "--quiet", "-k", version, file.to_str().unwrap()])
        .output()
        .unwrap_or_else(|e| panic!("{}: {e} (scripts/bootstrap installs it)", tool.display()));
    let report =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success() && !report.contains("ERROR"), report)
}

/// The rendered objects as JSON.
fn objects(overlay: &str) -> Vec<Value> {
    let json = python(
        "import sys, json, yaml\nprint(json.dumps([o for o in yaml.safe_load_all(sys.argv[1]) if o]))",
        &[&render(overlay)],
    );
    serde_json::from_str(&json).unwrap()
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

/// The training config every trainer mounts (its name carries Kustomize's content hash).
fn train_config(objects: &[Value]) -> &str {
    objects
        .iter()
        .find(|o| {
            o["kind"] == "ConfigMap"
                && o["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("lillm-train-config"))
        })
        .and_then(|o| o["data"]["train.toml"].as_str())
        .expect("a lillm-train-config ConfigMap with train.toml")
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// The value of `--flag=V` in an argument list.
fn flag(args: &[String], name: &str) -> String {
    let prefix = format!("{name}=");
    args.iter()
        .find_map(|a| a.strip_prefix(&prefix).map(String::from))
        .unwrap_or_else(|| panic!("{name} not in {args:?}"))
}

fn labels_match(selector: &Value, labels: &Value) -> bool {
    selector
        .as_object()
        .is_some_and(|s| !s.is_empty() && s.iter().all(|(k, v)| labels[k] == *v))
}

/// Workloads (StatefulSet, Job) with their pod template.
fn pod_templates(objects: &[Value]) -> Vec<(&Value, &Value)> {
    objects
        .iter()
        .filter(|o| matches!(o["kind"].as_str(), Some("StatefulSet" | "Job")))
        .map(|o| (o, &o["spec"]["template"]))
        .collect()
}

/// The value of environment variable `name` in a container, if set there.
fn env_value(container: &Value, name: &str) -> Option<String> {
    container["env"]
        .as_array()?
        .iter()
        .find(|v| v["name"] == name)
        .and_then(|v| v["value"].as_str().map(String::from))
}

#[test]
fn the_bucket_form_needs_no_shared_volume_and_reads_credentials_from_a_secret() {
    let objects = objects("gpu-bucket");
    // No claim but the coordinator's own state volume (ReadWriteOnce).
    let claims: Vec<_> = objects
        .iter()
        .filter(|o| o["kind"] == "PersistentVolumeClaim")
        .collect();
    assert!(claims.is_empty(), "{claims:?}");
    let coordinator = find(&objects, "StatefulSet", "lillm-coordinator");
    for t in coordinator["spec"]["volumeClaimTemplates"]
        .as_array()
        .unwrap()
    {
        assert_eq!(strs(&t["spec"]["accessModes"]), vec!["ReadWriteOnce"]);
    }
    let config: toml::Table = train_config(&objects).parse().unwrap();
    let data = config["data"].as_str().unwrap();
    assert!(
        config["out"].as_str().unwrap().starts_with("s3://"),
        "{config}"
    );
    assert!(data.starts_with("s3://"), "{config}");
    for (workload, template) in pod_templates(&objects) {
        let volumes = template["spec"]["volumes"].as_array().unwrap();
        assert!(
            volumes
                .iter()
                .all(|v| v.get("persistentVolumeClaim").is_none()),
            "{}: {volumes:?}",
            workload["metadata"]["name"]
        );
        for c in template["spec"]["containers"].as_array().unwrap() {
            let text = serde_json::to_string(c).unwrap();
            assert!(
                !text.contains("AWS_SECRET_ACCESS_KEY"),
                "a secret in a pod spec: {text}"
            );
            if c["name"] == "coordinator" {
                continue;
            }
            // The credentials file is the Secret, mounted where the variable says.
            let file = env_value(c, "LILLM_CREDENTIALS_FILE").unwrap();
            let mount = c["volumeMounts"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| file.starts_with(m["mountPath"].as_str().unwrap()))
                .unwrap_or_else(|| panic!("nothing mounted at {file}"));
            let volume = volumes.iter().find(|v| v["name"] == mount["name"]).unwrap();
            assert_eq!(volume["secret"]["secretName"], "lillm-storage");
            assert!(env_value(c, "LILLM_CACHE_DIR").is_some());
        }
    }
    let loaders = find(&objects, "StatefulSet", "lillm-dataloader");
    let loader = &loaders["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        env_value(loader, "LILLM_DATA").as_deref(),
        Some(data),
        "dataloaders serve the dataset the trainers are configured with"
    );
    let limit = env_value(loader, "LILLM_CACHE_BYTES").unwrap();
    assert!(
        lillm_ok(&["dataloader", "--help"]).contains("LILLM_CACHE_BYTES"),
        "the dataloader reads its cache limit"
    );
    assert!(limit.ends_with('G'), "{limit}");
}

/// Environment variables a subcommand reads, from its `--help` (`[env: NAME=…]`).
fn env_read_by(subcommand: &str) -> BTreeSet<String> {
    let help = lillm_ok(&[subcommand, "--help"]);
    help.split("[env: ")
        .skip(1)
        .filter_map(|rest| rest.split(['=', ']']).next().map(String::from))
        .collect()
}

#[test]
fn every_overlay_renders_and_validates_strictly() {
    for overlay in OVERLAYS {
        let yaml = render(overlay);
        for version in [OLDEST, NEWEST] {
            let (ok, report) = validate(&yaml, version);
            assert!(ok, "{overlay} against Kubernetes {version}:\n{report}");
        }
    }
    // The validator is strict: an unknown field fails it.
    let typo = render("cpu").replace("podReplacementPolicy", "podReplacementPolicyy");
    assert!(
        !validate(&typo, OLDEST).0,
        "a misspelt field must fail validation"
    );
}

#[test]
fn rendered_manifests_keep_the_jobs_invariants() {
    for overlay in OVERLAYS {
        let objects = objects(overlay);
        let templates = pod_templates(&objects);
        // Selectors select: every workload's selector matches its own template, and every
        // Service, PodDisruptionBudget and NetworkPolicy selects some pod template.
        for (workload, template) in &templates {
            if workload["kind"] == "StatefulSet" {
                assert!(
                    labels_match(
                        &workload["spec"]["selector"]["matchLabels"],
                        &template["metadata"]["labels"]
                    ),
                    "{overlay}: {} does not select its own pods",
                    workload["metadata"]["name"]
                );
                let service = workload["spec"]["serviceName"].as_str().unwrap();
                find(&objects, "Service", service);
            }
        }
        for o in &objects {
            let selector = match o["kind"].as_str() {
                Some("Service") => &o["spec"]["selector"],
                Some("PodDisruptionBudget") => &o["spec"]["selector"]["matchLabels"],
                Some("NetworkPolicy") => &o["spec"]["podSelector"]["matchLabels"],
                _ => continue,
            };
            assert!(
                templates
                    .iter()
                    .any(|(_, t)| labels_match(selector, &t["metadata"]["labels"])),
                "{overlay}: {} {} selects no pods",
                o["kind"],
                o["metadata"]["name"]
            );
        }

        // Every mounted volume exists in its pod (or the StatefulSet's claim templates).
        for (workload, template) in &templates {
            let mut volumes: BTreeSet<String> = template["spec"]["volumes"]
                .as_array()
                .into_iter()
                .flatten()
                .chain(
                    workload["spec"]["volumeClaimTemplates"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|t| &t["metadata"]),
                )
                .filter_map(|v| v["name"].as_str().map(String::from))
                .collect();
            volumes.retain(|v| !v.is_empty());
            for container in template["spec"]["containers"].as_array().unwrap() {
                for mount in container["volumeMounts"].as_array().into_iter().flatten() {
                    let name = mount["name"].as_str().unwrap();
                    assert!(
                        volumes.contains(name),
                        "{overlay}: {} mounts {name}, which its pod does not have ({volumes:?})",
                        container["name"]
                    );
                }
            }
        }

        // The Job's subdomain is the headless Service of its own pods.
        let job = find(&objects, "Job", "lillm-trainers");
        let pod = &job["spec"]["template"];
        let subdomain = pod["spec"]["subdomain"].as_str().unwrap();
        let headless = find(&objects, "Service", subdomain);
        assert_eq!(headless["spec"]["clusterIP"], "None", "{overlay}");
        assert!(labels_match(
            &headless["spec"]["selector"],
            &pod["metadata"]["labels"]
        ));
        assert_eq!(job["spec"]["completionMode"], "Indexed");
        assert_eq!(
            pod["spec"]["restartPolicy"], "Never",
            "podFailurePolicy needs Never"
        );

        // One size everywhere: nodes and trainers per node.
        let coordinator = find(&objects, "StatefulSet", "lillm-coordinator");
        let coordinator_args =
            strs(&coordinator["spec"]["template"]["spec"]["containers"][0]["args"]);
        let nodes: u64 = flag(&coordinator_args, "--nodes").parse().unwrap();
        let per_node: u64 = flag(&coordinator_args, "--trainers-per-node")
            .parse()
            .unwrap();
        assert_eq!(job["spec"]["completions"], nodes, "{overlay}: completions");
        assert_eq!(job["spec"]["parallelism"], nodes, "{overlay}: parallelism");
        let loaders = find(&objects, "StatefulSet", "lillm-dataloader");
        assert_eq!(
            loaders["spec"]["replicas"], nodes,
            "{overlay}: one dataloader per node"
        );
        let trainer = &pod["spec"]["containers"][0];
        let trainer_args = strs(&trainer["args"]);
        assert_eq!(
            flag(&trainer_args, "--nproc"),
            per_node.to_string(),
            "{overlay}"
        );
        let gpus = &trainer["resources"]["limits"]["nvidia.com/gpu"];
        if !gpus.is_null() {
            assert_eq!(*gpus, per_node, "{overlay}: one GPU per trainer");
        }
        // The training config is a valid config for that many ranks.
        let dir = tempfile::tempdir().unwrap();
        let toml = dir.path().join("train.toml");
        std::fs::write(&toml, train_config(&objects)).unwrap();
        let world = (nodes * per_node).to_string();
        lillm_ok(&[
            "train",
            "--config",
            s(&toml),
            "--world-size",
            &world,
            "--print-config",
        ]);

        // Every environment variable is one the binary reads, or a helper another value
        // of the same container refers to as $(NAME).
        for (_, template) in &templates {
            for container in template["spec"]["containers"].as_array().unwrap() {
                let args = strs(&container["args"]);
                let read = env_read_by(&args[0]);
                let env = container["env"].as_array().unwrap();
                let text = serde_json::to_string(&container["args"]).unwrap()
                    + &serde_json::to_string(&container["env"]).unwrap();
                for var in env {
                    let name = var["name"].as_str().unwrap();
                    assert!(
                        read.contains(name) || text.contains(&format!("$({name})")),
                        "{overlay}: {} sets {name}, which `lillm {}` does not read ({read:?})",
                        container["name"],
                        args[0]
                    );
                }
            }
        }

        // Every port named is one a process listens on; probes ask those ports; the
        // coordinator address the members dial is the coordinator Service's gRPC port.
        for (_, template) in &templates {
            for container in template["spec"]["containers"].as_array().unwrap() {
                let args = strs(&container["args"]);
                let listening: BTreeMap<u64, String> = args
                    .iter()
                    .filter_map(|a| {
                        let (name, value) = a.split_once('=')?;
                        name.ends_with("listen").then_some(())?;
                        Some((value.rsplit_once(':')?.1.parse().ok()?, name.to_string()))
                    })
                    .collect();
                let mut declared = BTreeMap::new();
                for port in container["ports"].as_array().into_iter().flatten() {
                    let number = port["containerPort"].as_u64().unwrap();
                    assert!(
                        listening.contains_key(&number),
                        "{overlay}: {} declares port {number}, on which nothing listens ({listening:?})",
                        container["name"]
                    );
                    declared.insert(port["name"].as_str().unwrap().to_string(), number);
                }
                for probe in ["readinessProbe", "livenessProbe"] {
                    if let Some(port) = container[probe]["grpc"]["port"].as_u64() {
                        assert_eq!(
                            listening.get(&port).map(String::as_str),
                            Some("--health-listen"),
                            "{overlay}: {}'s {probe} must ask the plaintext health port",
                            container["name"]
                        );
                    }
                }
                for o in objects.iter().filter(|o| o["kind"] == "Service") {
                    if !labels_match(&o["spec"]["selector"], &template["metadata"]["labels"]) {
                        continue;
                    }
                    for port in o["spec"]["ports"].as_array().into_iter().flatten() {
                        let target = port["targetPort"].as_str().unwrap();
                        assert!(
                            declared.contains_key(target),
                            "{overlay}: Service {} targets port {target}, which {} does not declare",
                            o["metadata"]["name"],
                            container["name"]
                        );
                    }
                }
                for var in container["env"].as_array().unwrap() {
                    if var["name"] == "LILLM_COORDINATOR" {
                        let (host, port) = var["value"].as_str().unwrap().split_once(':').unwrap();
                        let service = find(&objects, "Service", host);
                        assert!(
                            service["spec"]["ports"]
                                .as_array()
                                .unwrap()
                                .iter()
                                .any(|p| p["port"].as_u64().unwrap().to_string() == port && p["name"] == "grpc"),
                            "{overlay}: LILLM_COORDINATOR={host}:{port} is not the coordinator's gRPC port"
                        );
                    }
                }
            }
        }
        for policy in objects.iter().filter(|o| o["kind"] == "NetworkPolicy") {
            let selected = templates
                .iter()
                .find(|(_, t)| {
                    labels_match(
                        &policy["spec"]["podSelector"]["matchLabels"],
                        &t["metadata"]["labels"],
                    )
                })
                .unwrap()
                .1;
            let ports: BTreeSet<u64> = selected["spec"]["containers"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|c| c["ports"].as_array().cloned().unwrap_or_default())
                .filter_map(|p| p["containerPort"].as_u64())
                .collect();
            for rule in policy["spec"]["ingress"].as_array().unwrap() {
                for port in rule["ports"].as_array().into_iter().flatten() {
                    let number = port["port"].as_u64().unwrap();
                    assert!(
                        ports.contains(&number),
                        "{overlay}: NetworkPolicy {} admits port {number}, which its pods do not serve",
                        policy["metadata"]["name"]
                    );
                }
            }
        }
    }
}

/// Expands `$(NAME)` references the way the kubelet does.
fn expand(text: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = text.to_string();
    for (name, value) in env {
        out = out.replace(&format!("$({name})"), value);
    }
    out
}

#[test]
fn the_trainer_pods_command_joins_a_job_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = tiny_data(dir.path(), 300);
    let objects = objects("cpu");
    let pod = &find(&objects, "Job", "lillm-trainers")["spec"]["template"];
    let container = &pod["spec"]["containers"][0];
    let grace = pod["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .unwrap();
    let per_node = flag(&strs(&container["args"]), "--nproc");

    // The mounted training config, with its volume paths moved into this test's directory.
    let runs = dir.path().join("runs");
    let config_text = train_config(&objects)
        .replace("\"/runs/", &format!("\"{}/", runs.display()))
        .replace("\"/data\"", &format!("\"{}\"", tiny.data.display()));
    let etc = dir.path().join("etc");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::write(etc.join("train.toml"), config_text).unwrap();

    // A job of this one node, with a token, and its node's dataloader.
    let token = "s3cret";
    let job = Job::new(
        dir.path(),
        1,
        per_node.parse().unwrap(),
        &[&format!("--job-token={token}")],
    );
    let _coordinator = job.start_coordinator();
    let mut loader_args = job.dataloader_args(&tiny.data, "node-0", "127.0.0.1:0");
    loader_args.push(format!("--job-token={token}"));
    let _loader = Actor::lillm(&loader_args, dir.path().join("loader.log"));

    // The pod's environment, resolved as the kubelet would for pod 0 of the Job.
    let mut env = BTreeMap::new();
    for var in container["env"].as_array().unwrap() {
        let name = var["name"].as_str().unwrap().to_string();
        let from = &var["valueFrom"];
        let value = if let Some(v) = var["value"].as_str() {
            expand(v, &env)
        } else if from["fieldRef"]["fieldPath"] == "status.podIP" {
            "127.0.0.1".into()
        } else if from["fieldRef"]["fieldPath"]
            .as_str()
            .is_some_and(|p| p.contains("job-completion-index"))
        {
            "0".into()
        } else if from["secretKeyRef"]["name"] == "lillm-job-token" {
            token.into()
        } else {
            panic!("the test does not know how to resolve {var}");
        };
        env.insert(name, value);
    }
    assert_eq!(env["LILLM_NODE"], "node-0");
    // The Service name resolves only in the cluster: point it at this test's coordinator.
    env.insert("LILLM_COORDINATOR".into(), job.address.clone());
    let args: Vec<String> = strs(&container["args"])
        .iter()
        .map(|a| expand(a, &env).replace("/etc/lillm/", &format!("{}/", etc.display())))
        .collect();
    assert_eq!(strs(&container["command"]), ["lillm"]);
    let log = dir.path().join("pod.log");
    let mut launcher = Command::new(env!("CARGO_BIN_EXE_lillm"))
        .args(&args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap())
        .env(
            "LD_LIBRARY_PATH",
            std::env::var("LD_LIBRARY_PATH").unwrap_or_default(),
        )
        .envs(&env)
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let run = runs.join("job");
    wait_until(Duration::from_secs(240), "3 training steps", || {
        losses(&run).len() >= 3
    });
    let status = job.status();
    assert_eq!(status["members"].as_array().unwrap().len(), 3, "{status}");

    // SIGTERM, as the kubelet sends it: the step reached is checkpointed and committed,
    // every trainer is gone, and the exit status tells the Job to replace the pod.
    signal(launcher.id(), libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(grace);
    let code = loop {
        if let Some(status) = launcher.try_wait().unwrap() {
            break status.code();
        }
        assert!(
            Instant::now() < deadline,
            "still running {grace} s after SIGTERM:\n{}",
            std::fs::read_to_string(&log).unwrap()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(code, Some(143), "{log_text}");
    let stopped_at = losses(&run).last().unwrap().0;
    let status = job.status();
    assert_eq!(
        status["last_checkpoint"]["step"].as_u64(),
        Some(stopped_at),
        "the step the node stopped at is committed: {status}"
    );
    assert!(
        Path::new(&format!(
            "{}/checkpoints/step-{stopped_at:08}",
            run.display()
        ))
        .is_dir(),
        "{log_text}"
    );
}
