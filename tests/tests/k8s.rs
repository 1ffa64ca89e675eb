//! `bd3 launch k8s`: the objects it renders validate against the upstream MPIJob schema (unknown
//! fields rejected) and, for core objects, the Kubernetes API types (unknown fields reported);
//! the checks catch a misspelt field, a wrong type, a bad enum value and a missing required field;
//! the Secret's values appear in no other object; bad input is refused before anything is written.
//!
//! The upstream CRD schemas are read from `../shared/k8s-crds/` beside the repository.

use std::path::{Path, PathBuf};
use std::process::Output;

use k8s_openapi::api::core::v1::{ConfigMap, PodTemplateSpec, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::{json, Value};
use test_support::{assert_refused, bd3_with_path, repo_root, scratch_dir};

/// The `openAPIV3Schema` of the served version of an upstream CRD, made strict: every object
/// schema that lists its properties (and does not keep unknown fields on purpose) refuses others.
fn strict_crd_schema(file: &str) -> Value {
    let dir = repo_root().join("../shared/k8s-crds");
    let path = dir.join(file);
    assert!(
        path.is_file(),
        "{} is missing: the upstream CRD schemas are expected in {}",
        path.display(),
        dir.display()
    );
    let crd = launcher::k8s::read_yaml_documents(&path).unwrap().remove(0);
    let version = crd["spec"]["versions"].as_array().unwrap().iter().find(|v| v["served"] == true).unwrap();
    let mut schema = version["schema"]["openAPIV3Schema"].clone();
    forbid_unknown_fields(&mut schema);
    schema
}

fn forbid_unknown_fields(schema: &mut Value) {
    match schema {
        Value::Object(map) => {
            let keeps_unknown = map.get("x-kubernetes-preserve-unknown-fields") == Some(&json!(true));
            if map.contains_key("properties") && !map.contains_key("additionalProperties") && !keeps_unknown {
                map.insert("additionalProperties".into(), json!(false));
            }
            map.values_mut().for_each(forbid_unknown_fields);
        }
        Value::Array(items) => items.iter_mut().for_each(forbid_unknown_fields),
        _ => {}
    }
}

/// Errors of `instance` against `schema`, as `pointer: message`.
fn schema_errors(schema: &Value, instance: &Value) -> Vec<String> {
    let validator = jsonschema::draft4::new(schema).expect("the CRD schema compiles");
    validator.iter_errors(instance).map(|e| format!("{}: {e}", e.instance_path())).collect()
}

/// Deserializes `value` as `T`, failing on a wrong type or a missing field, and on any field `T`
/// does not know (which serde would otherwise skip).
fn core_object<T: serde::de::DeserializeOwned>(value: &Value) -> Result<T, String> {
    let mut unknown = Vec::new();
    let object =
        serde_ignored::deserialize(value.clone(), |path| unknown.push(path.to_string())).map_err(|e| format!("{e}"))?;
    if unknown.is_empty() {
        Ok(object)
    } else {
        Err(format!("unknown fields: {unknown:?}"))
    }
}

/// Every check of one rendered object: the MPIJob against its CRD (its pod templates also as
/// core pod templates), core objects as their API types; every object's metadata.
fn check_object(object: &Value, mpijob_schema: &Value) -> Result<(), String> {
    core_object::<ObjectMeta>(&object["metadata"]).map_err(|e| format!("metadata: {e}"))?;
    match object["kind"].as_str() {
        Some("MPIJob") => {
            let errors = schema_errors(mpijob_schema, object);
            if !errors.is_empty() {
                return Err(errors.join("\n"));
            }
            for replica in ["Launcher", "Worker"] {
                let template = &object["spec"]["mpiReplicaSpecs"][replica]["template"];
                core_object::<PodTemplateSpec>(template).map_err(|e| format!("{replica} template: {e}"))?;
            }
            Ok(())
        }
        Some("ConfigMap") => core_object::<ConfigMap>(object).map(drop),
        Some("Secret") => core_object::<Secret>(object).map(drop),
        other => Err(format!("unexpected kind {other:?}")),
    }
}

/// `bd3 launch k8s` in the repository with `args` and this PATH.
fn launch(args: &[&str], path: &str) -> Output {
    bd3_with_path(&[&["launch", "k8s"], args].concat(), path)
}

fn ok(out: Output) -> String {
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "bd3 failed\nstdout:\n{stdout}\nstderr:\n{stderr}");
    stdout.into_owned()
}

const CREDENTIALS: [(&str, &str); 2] =
    [("AWS_ACCESS_KEY_ID", "AKIAEXAMPLEKEY7Q3Z"), ("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLE")];

/// A 2-node × 8-GPU run of configs/small.toml in `run_dir` with credentials; the overlay's directory.
fn render_small(run_dir: &Path) -> PathBuf {
    let credentials = run_dir.join("credentials.env");
    std::fs::create_dir_all(run_dir).unwrap();
    let lines: String = CREDENTIALS.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
    std::fs::write(&credentials, format!("# object store\n{lines}")).unwrap();
    let run_dir_set = format!("run.dir={:?}", run_dir.display().to_string());
    let options = "--nodes 2 --gpus-per-node 8 --image registry.example.com/bd3:0.1 --namespace research \
                   --checkpoint-url s3://checkpoints/small --shm-size 64Gi";
    let mut args: Vec<&str> = options.split_whitespace().collect();
    args.extend(["--credentials", credentials.to_str().unwrap()]);
    args.extend([
        "--",
        "train",
        "--config",
        "configs/small.toml",
        "--set",
        &run_dir_set,
        "--set",
        "train.grad_accum=2",
    ]);
    ok(launch(&args, ""));
    run_dir.join("small/k8s")
}

#[test]
fn rendered_manifests_validate_and_keep_the_secret_to_itself() {
    let scratch = scratch_dir("k8s");
    let overlay = render_small(scratch.path());
    let objects = launcher::k8s::read_yaml_documents(&overlay.join("manifests.yaml")).unwrap();
    let kinds: Vec<&str> = objects.iter().map(|o| o["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["ConfigMap", "Secret", "MPIJob"]);
    let schema = strict_crd_schema("kubeflow.org_mpijobs.yaml");
    for object in &objects {
        check_object(object, &schema).unwrap_or_else(|e| panic!("{} does not validate:\n{e}", object["kind"]));
        assert_eq!(object["metadata"]["namespace"], "research");
    }
    let [config_map, secret, job] = [0, 1, 2].map(|i| &objects[i]);

    // The run's shape: one worker pod per node, a rank per GPU, /dev/shm, restarts that resume.
    let spec = &job["spec"];
    assert_eq!(job["metadata"]["name"], "bd3-small");
    assert_eq!(spec["mpiReplicaSpecs"]["Worker"]["replicas"], 2);
    assert_eq!(spec["slotsPerWorker"], 8);
    let worker = &spec["mpiReplicaSpecs"]["Worker"]["template"]["spec"];
    let launcher_pod = &spec["mpiReplicaSpecs"]["Launcher"]["template"]["spec"];
    assert_eq!(worker["containers"][0]["resources"]["limits"]["nvidia.com/gpu"], 8);
    assert_eq!(worker["containers"][0]["image"], "registry.example.com/bd3:0.1");
    let shm = worker["volumes"].as_array().unwrap().iter().find(|v| v["name"] == "dshm").unwrap();
    assert_eq!(shm["emptyDir"], json!({ "medium": "Memory", "sizeLimit": "64Gi" }));
    assert_eq!(spec["mpiReplicaSpecs"]["Launcher"]["restartPolicy"], "OnFailure");
    let script = launcher_pod["containers"][0]["command"][2].as_str().unwrap();
    assert!(script.contains("bd3 train --config /etc/bd3/config.toml --resume auto"), "{script}");
    let env = |name: &str| {
        let env = launcher_pod["containers"][0]["env"].as_array().unwrap();
        env.iter().find(|e| e["name"] == name).map(|e| e["value"].clone()).unwrap()
    };
    assert_eq!(env("BD3_STEPS"), "1000000");
    assert_eq!(env("BD3_CHECKPOINT_URL"), "s3://checkpoints/small");

    // The config is the resolved one, checkpoints on object storage, and loads as a bd3 config.
    assert_eq!(config_map["metadata"]["name"], "bd3-config-small");
    let toml = config_map["data"]["config.toml"].as_str().unwrap();
    let cfg = trainer::Config::from_toml_str(toml, &[]).unwrap();
    assert_eq!(cfg.checkpoint.url, "s3://checkpoints/small");
    assert_eq!(cfg.train.grad_accum, 2);
    for pod in [launcher_pod, worker] {
        assert_eq!(pod["volumes"][0]["configMap"]["name"], "bd3-config-small", "the ConfigMap's new name");
        assert_eq!(pod["containers"][0]["envFrom"][0]["secretRef"]["name"], secret["metadata"]["name"]);
    }

    // Credentials: in the Secret only, as the environment variables bd3-storage reads.
    for (name, value) in CREDENTIALS {
        assert_eq!(secret["stringData"][name], value);
        for other in [config_map, job] {
            let text = serde_json::to_string(other).unwrap();
            assert!(!text.contains(value), "the value of {name} appears in the {}", other["kind"]);
        }
    }
    // The overlay: its base by a relative path, the patch and the added objects beside it.
    let kustomization = launcher::k8s::read_yaml_documents(&overlay.join("kustomization.yaml")).unwrap().remove(0);
    let base = overlay.join(kustomization["resources"][0].as_str().unwrap());
    assert_eq!(base.canonicalize().unwrap(), repo_root().join("k8s/base").canonicalize().unwrap());
    assert_eq!(kustomization["nameSuffix"], "-small");
    for file in ["mpijob-patch.yaml", "configmap.yaml", "secret.yaml"] {
        assert!(overlay.join(file).is_file(), "{file} is missing from the overlay");
    }
}

/// An edit that breaks a copy of an object.
type Break = Box<dyn Fn(&mut Value)>;

/// The object holding the field at JSON pointer `at`, and the field's name.
fn parent_of<'a>(object: &'a mut Value, at: &str) -> (&'a mut serde_json::Map<String, Value>, String) {
    let (parent, key) = at.rsplit_once('/').unwrap();
    (object.pointer_mut(parent).unwrap().as_object_mut().unwrap(), key.to_string())
}

fn rename(at: &str, to: &str) -> Break {
    let (at, to) = (at.to_string(), to.to_string());
    Box::new(move |o| {
        let (map, key) = parent_of(o, &at);
        let value = map.remove(&key).unwrap();
        map.insert(to.clone(), value);
    })
}

fn set(at: &str, value: Value) -> Break {
    let at = at.to_string();
    Box::new(move |o| *o.pointer_mut(&at).unwrap() = value.clone())
}

fn remove(at: &str) -> Break {
    let at = at.to_string();
    Box::new(move |o| {
        let (map, key) = parent_of(o, &at);
        map.remove(&key).unwrap();
    })
}

#[test]
fn validation_catches_misspelt_fields_wrong_types_bad_enums_and_missing_fields() {
    let scratch = scratch_dir("k8s-negative");
    let overlay = render_small(scratch.path());
    let objects = launcher::k8s::read_yaml_documents(&overlay.join("manifests.yaml")).unwrap();
    let schema = strict_crd_schema("kubeflow.org_mpijobs.yaml");
    let job = objects.iter().find(|o| o["kind"] == "MPIJob").unwrap();
    let config_map = objects.iter().find(|o| o["kind"] == "ConfigMap").unwrap();
    let worker = "/spec/mpiReplicaSpecs/Worker";

    // Each broken copy fails, and the error points at what is wrong.
    let broken: Vec<(&str, &Value, Break, &[&str])> = vec![
        ("misspelt field", job, Box::new(rename("/spec/slotsPerWorker", "slotPerWorker")), &["slotPerWorker"]),
        (
            "misspelt pod field",
            job,
            Box::new(rename(&format!("{worker}/template/spec/volumes"), "volume")),
            &["/spec/mpiReplicaSpecs/Worker/template/spec", "volume"],
        ),
        (
            "wrong type",
            job,
            Box::new(set("/spec/mpiReplicaSpecs/Worker/replicas", json!("2"))),
            &["/spec/mpiReplicaSpecs/Worker/replicas"],
        ),
        (
            "bad enum value",
            job,
            Box::new(set("/spec/mpiImplementation", json!("OpenMP"))),
            &["/spec/mpiImplementation", "OpenMP"],
        ),
        (
            "missing required field",
            job,
            Box::new(remove("/spec/mpiReplicaSpecs/Worker/template/spec/containers/0/name")),
            &["/spec/mpiReplicaSpecs/Worker/template/spec/containers/0", "name"],
        ),
        ("misspelt core field", config_map, Box::new(rename("/data", "dat")), &["dat"]),
        ("wrong core type", config_map, Box::new(set("/data", json!(["config.toml"]))), &["invalid type"]),
        ("misspelt metadata field", config_map, Box::new(rename("/metadata/labels", "label")), &["metadata", "label"]),
    ];
    for (what, object, breaks, expected) in broken {
        let mut copy = object.clone();
        breaks(&mut copy);
        let err = check_object(&copy, &schema).expect_err(what);
        for e in expected {
            assert!(err.contains(e), "{what}: the error does not mention {e:?}:\n{err}");
        }
    }
}

#[test]
fn bad_input_is_refused_before_anything_is_written() {
    let scratch = scratch_dir("k8s-refusals");
    let dir = scratch.path();
    let run_dir = format!("run.dir={:?}", dir.display().to_string());
    // `bd3 launch k8s` with the options in `launch_args` (a 2 × 8 job unless they say otherwise)
    // of a tiny run in `dir` with `train_args`.
    let command = |launch_args: &[&str], train_args: &[&str]| -> Vec<String> {
        let shape =
            if launch_args.contains(&"--nodes") { vec![] } else { vec!["--nodes", "2", "--gpus-per-node", "8"] };
        let train = ["--", "train", "--config", "configs/tiny.toml", "--set", &run_dir];
        [&shape[..], &["--image", "bd3:1"], launch_args, &train, train_args]
            .concat()
            .into_iter()
            .map(String::from)
            .collect()
    };
    let to_s3 = ["--checkpoint-url", "s3://c/x"];
    let refusals: Vec<(Vec<String>, &[&str])> = vec![
        (
            command(&[&to_s3[..], &["--nodes", "0", "--gpus-per-node", "8"]].concat(), &[]),
            &["--nodes must be at least 1"],
        ),
        (
            command(&[&to_s3[..], &["--nodes", "2", "--gpus-per-node", "0"]].concat(), &[]),
            &["--gpus-per-node must be at least 1"],
        ),
        (command(&to_s3, &["--set", "model.hiden=64"]), &["configs/tiny.toml", "field `model.hiden`"]),
        (command(&[], &["--set", "checkpoint.url=\"/local/ckpt\""]), &["\"/local/ckpt\"", "object storage"]),
        (command(&[&to_s3[..], &["--shm-size", "lots"]].concat(), &[]), &["--shm-size \"lots\""]),
        (command(&to_s3, &["--set", "run.name=\"Tiny_Run\""]), &["run.name \"Tiny_Run\""]),
        (command(&[&to_s3[..], &["--apply"]].concat(), &[]), &["`kubectl` is not on PATH"]),
    ];
    let nothing_written = || std::fs::read_dir(dir).unwrap().count() == 0;
    for (args, expected) in &refusals {
        let out = launch(&args.iter().map(String::as_str).collect::<Vec<_>>(), "/nonexistent");
        assert_refused(&out, args, expected);
        assert!(nothing_written(), "{args:?}: a refused launch wrote files");
    }
    // A credentials file with something other than object-store variables: the line is named.
    let credentials = scratch_dir("k8s-credentials");
    let file = credentials.path().join("bad.env");
    std::fs::write(&file, "AWS_ACCESS_KEY_ID=x\nPATH=/tmp\n").unwrap();
    let args = command(&[&to_s3[..], &["--credentials", file.to_str().unwrap()]].concat(), &[]);
    let out = launch(&args.iter().map(String::as_str).collect::<Vec<_>>(), "");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("bad.env:2") && stderr.contains("\"PATH\""), "{stderr}");
    assert!(nothing_written());
}
