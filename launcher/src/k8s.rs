//! `bd3 launch k8s`: a run on Kubernetes as a kustomize overlay of the base in `k8s/base/` (a
//! Kubeflow MPIJob), written into the run directory, plus the objects it renders to
//! (`manifests.yaml`), which `--apply` gives to `kubectl apply`.
//!
//! The overlay adds the run's resolved config as a ConfigMap and, from `--credentials`, a Secret
//! whose variables (`AWS_*`, …) reach the pods as environment variables; it sets the image, the
//! worker count (one pod per node), the GPUs per worker, the step count and checkpoint URL the
//! launcher checks, and `/dev/shm`'s size through JSON patches (RFC 6902), and gives every
//! object the suffix `-<run.name>`. bd3 renders the overlay itself with the subset of kustomize it
//! uses (resources, `namespace`, `nameSuffix` with the base's name references, JSON patches with
//! `test` and `replace`), so that `manifests.yaml` can be checked without a cluster.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::{find_program, TrainCommand};

/// `bd3 launch k8s`'s options (the command line is in src/main.rs).
#[derive(Args, Debug)]
pub struct K8sArgs {
    /// Worker pods, one per node.
    #[arg(long)]
    pub nodes: u32,
    /// GPUs per worker pod: one rank per GPU.
    #[arg(long)]
    pub gpus_per_node: u32,
    /// The container image (built from the repository's Dockerfile).
    #[arg(long)]
    pub image: String,
    /// Where checkpoints go: object storage (s3://, gs://, az://), since a pod's disk does not
    /// outlive it. Default: the config's checkpoint.url.
    #[arg(long)]
    pub checkpoint_url: Option<String>,
    #[arg(long)]
    pub namespace: Option<String>,
    /// A file of `NAME=value` lines (AWS_*, GOOGLE_*, AZURE_*) that becomes the run's Secret.
    #[arg(long, conflicts_with = "secret")]
    pub credentials: Option<PathBuf>,
    /// An existing Secret that holds the object-store credentials (when no --credentials).
    #[arg(long, default_value = "bd3-object-store")]
    pub secret: String,
    /// Size of each worker's /dev/shm (NCCL's intra-node transport), a Kubernetes quantity.
    #[arg(long, default_value = "32Gi")]
    pub shm_size: String,
    /// The kustomize base.
    #[arg(long, default_value = "k8s/base")]
    pub base: PathBuf,
    /// Print the rendered objects instead of writing the overlay.
    #[arg(long, conflicts_with = "apply")]
    pub dry_run: bool,
    /// Run `kubectl apply` on the rendered objects.
    #[arg(long)]
    pub apply: bool,
    /// The bd3 command every rank runs: `train --config X [--set …]` (restarts add `--resume auto`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
    pub command: Vec<String>,
}

/// The object-store schemes checkpoints may go to from a pod.
const OBJECT_STORE_SCHEMES: [&str; 3] = ["s3://", "gs://", "az://"];
/// Prefixes of the variables a credentials file may set (those bd3-storage reads).
const CREDENTIAL_PREFIXES: [&str; 3] = ["AWS_", "GOOGLE_", "AZURE_"];
/// The MPIJob of the base, which the overlay patches.
const BASE_JOB: &str = "bd3";
/// The base's ConfigMap and Secret names (before the run's suffix).
const CONFIG_MAP: &str = "bd3-config";
const SECRET: &str = "bd3-object-store";

/// `bd3 launch k8s`: checks everything, renders, and writes (or prints, or applies).
pub fn launch(args: &K8sArgs, train: TrainCommand) -> Result<()> {
    ensure!(args.nodes > 0, "--nodes must be at least 1");
    ensure!(args.gpus_per_node > 0, "--gpus-per-node must be at least 1");
    let kubectl = if args.apply {
        Some(find_program("kubectl").context(
            "`kubectl` is not on PATH: --apply runs `kubectl apply` (install kubectl, or leave out --apply \
             and apply the written manifests yourself)",
        )?)
    } else {
        None
    };
    let workdir = std::env::current_dir().context("reading the current directory")?;
    let overlay_dir = workdir.join(train.config.run_dir()).join("k8s");
    let run = K8sRun::new(args, train, &workdir.join(&args.base), &overlay_dir)?;
    let manifests = run.render()?;
    if args.dry_run {
        print!("{}", to_yaml_documents(&manifests)?);
        return Ok(());
    }
    let manifests_path = run.write(&manifests)?;
    println!("wrote the overlay {} and its objects {}", overlay_dir.display(), manifests_path.display());
    if let Some(kubectl) = kubectl {
        let status = Command::new(&kubectl)
            .arg("apply")
            .arg("-f")
            .arg(&manifests_path)
            .status()
            .with_context(|| format!("running {}", kubectl.display()))?;
        ensure!(status.success(), "kubectl apply -f {} failed ({status})", manifests_path.display());
    }
    Ok(())
}

/// One run's overlay: what it adds to the base and how it patches it.
pub struct K8sRun {
    base_dir: PathBuf,
    overlay_dir: PathBuf,
    namespace: Option<String>,
    name_suffix: String,
    /// The ConfigMap, and the Secret when credentials were given.
    resources: Vec<(String, Value)>,
    /// JSON patch operations on the base's MPIJob.
    job_patch: Vec<Value>,
}

impl K8sRun {
    /// Checks the options and the run's config and builds the overlay.
    pub fn new(args: &K8sArgs, train: TrainCommand, base_dir: &Path, overlay_dir: &Path) -> Result<Self> {
        let name = train.config.run.name.clone();
        // Pods are named `<job>-worker-<i>`: the run's name must fit in a DNS label with room to spare.
        ensure!(
            is_dns_label(&name) && name.len() <= 40,
            "run.name {name:?} cannot name Kubernetes objects: use at most 40 lowercase letters, digits and \
             `-`, starting and ending with a letter or digit"
        );
        if let Some(ns) = &args.namespace {
            ensure!(is_dns_label(ns), "--namespace {ns:?}: expected lowercase letters, digits and `-`");
        }
        ensure!(
            is_quantity(&args.shm_size),
            "--shm-size {:?}: expected a Kubernetes quantity such as 32Gi or 512Mi",
            args.shm_size
        );
        ensure!(
            !args.image.trim().is_empty() && !args.image.contains(char::is_whitespace),
            "--image {:?}: expected an image reference",
            args.image
        );
        ensure!(is_dns_subdomain(&args.secret), "--secret {:?}: expected a Secret's name", args.secret);
        ensure!(
            base_dir.join("kustomization.yaml").is_file(),
            "{}: no kustomization.yaml; --base names the kustomize base (the repository's k8s/base)",
            base_dir.display()
        );

        // The config the pods train with: the resolved one, checkpoints on object storage.
        let train = match &args.checkpoint_url {
            Some(url) => {
                let mut overrides = train.overrides.clone();
                overrides.push(format!("checkpoint.url={url:?}"));
                TrainCommand::load(train.config_path.clone(), overrides, train.resume.clone())?
            }
            None => train,
        };
        let cfg = &train.config;
        let url = cfg.checkpoint.url.as_str();
        ensure!(
            OBJECT_STORE_SCHEMES.iter().any(|s| url.starts_with(s)),
            "checkpoint.url {url:?}: a Kubernetes run needs checkpoints on object storage ({}), since a pod's \
             disk goes with the pod; set it with --checkpoint-url",
            OBJECT_STORE_SCHEMES.join(", ")
        );
        let config_map = json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": { "name": CONFIG_MAP, "labels": { "app.kubernetes.io/name": "bd3" } },
            "data": { "config.toml": cfg.to_toml()? },
        });
        let mut resources = vec![("configmap.yaml".to_string(), config_map)];
        if let Some(file) = &args.credentials {
            let secret = json!({
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": { "name": SECRET, "labels": { "app.kubernetes.io/name": "bd3" } },
                "type": "Opaque",
                "stringData": read_credentials(file)?,
            });
            resources.push(("secret.yaml".into(), secret));
        }

        let (n, g) = (args.nodes, args.gpus_per_node);
        let launcher = "/spec/mpiReplicaSpecs/Launcher/template/spec";
        let worker = "/spec/mpiReplicaSpecs/Worker/template/spec";
        let mut job_patch = vec![
            replace("/spec/slotsPerWorker", json!(g)),
            replace("/spec/mpiReplicaSpecs/Worker/replicas", json!(n)),
            replace(&format!("{launcher}/containers/0/image"), json!(args.image)),
            replace(&format!("{worker}/containers/0/image"), json!(args.image)),
            replace(&format!("{worker}/containers/0/resources/limits/nvidia.com~1gpu"), json!(g)),
            // The base's layout, checked before the index-based replacements below.
            test(&format!("{launcher}/containers/0/env/0/name"), json!("BD3_STEPS")),
            replace(&format!("{launcher}/containers/0/env/0/value"), json!(cfg.train.steps.to_string())),
            test(&format!("{launcher}/containers/0/env/1/name"), json!("BD3_CHECKPOINT_URL")),
            replace(&format!("{launcher}/containers/0/env/1/value"), json!(url)),
            test(&format!("{worker}/volumes/1/name"), json!("dshm")),
            replace(&format!("{worker}/volumes/1/emptyDir/sizeLimit"), json!(args.shm_size)),
        ];
        if args.credentials.is_none() {
            for spec in [launcher, worker] {
                job_patch.push(replace(&format!("{spec}/containers/0/envFrom/0/secretRef/name"), json!(args.secret)));
            }
        }
        Ok(Self {
            base_dir: base_dir.to_path_buf(),
            overlay_dir: overlay_dir.to_path_buf(),
            namespace: args.namespace.clone(),
            name_suffix: format!("-{name}"),
            resources,
            job_patch,
        })
    }

    /// The objects the overlay renders to, as kustomize would render them: ConfigMap, Secret, MPIJob.
    pub fn render(&self) -> Result<Vec<Value>> {
        let base: Kustomization = read_yaml(&self.base_dir.join("kustomization.yaml"))?;
        let mut objects: Vec<Value> = self.resources.iter().map(|(_, v)| v.clone()).collect();
        for file in &base.resources {
            objects.extend(read_yaml_documents(&self.base_dir.join(file))?);
        }
        let mut references = Vec::new();
        for file in &base.configurations {
            let config: NameReferenceConfig = read_yaml(&self.base_dir.join(file))?;
            references.extend(config.name_reference);
        }

        let job = objects
            .iter_mut()
            .find(|o| o["kind"] == "MPIJob" && o["metadata"]["name"] == BASE_JOB)
            .with_context(|| format!("{}: no MPIJob named {BASE_JOB}", self.base_dir.display()))?;
        apply_json_patch(job, &self.job_patch).context("patching the base's MPIJob")?;

        // Renaming: every object gets the suffix, and every field the base lists as naming an
        // object of the set follows it (names of objects outside the set stay as they are).
        let renamed: BTreeMap<(String, String), String> =
            objects.iter().map(|o| (kind_and_name(o), format!("{}{}", name_of(o), self.name_suffix))).collect();
        for object in &mut objects {
            let new_name = renamed[&kind_and_name(object)].clone();
            object["metadata"]["name"] = json!(new_name);
            if let Some(ns) = &self.namespace {
                object["metadata"]["namespace"] = json!(ns);
            }
        }
        for reference in &references {
            for spec in &reference.field_specs {
                for object in objects.iter_mut().filter(|o| o["kind"] == spec.kind.as_str()) {
                    let segments: Vec<&str> = spec.path.split('/').collect();
                    rename_at(object, &segments, &|old| {
                        renamed.get(&(reference.kind.clone(), old.to_string())).cloned()
                    });
                }
            }
        }
        objects.sort_by_key(|o| KIND_ORDER.iter().position(|k| o["kind"] == *k).unwrap_or(KIND_ORDER.len()));
        Ok(objects)
    }

    /// Writes the overlay and `manifests.yaml` into the overlay directory; the latter's path.
    pub fn write(&self, manifests: &[Value]) -> Result<PathBuf> {
        let dir = &self.overlay_dir;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let base = relative_path(dir, &self.base_dir)?;
        let mut resources = vec![json!(base.display().to_string())];
        resources.extend(self.resources.iter().map(|(file, _)| json!(file)));
        let mut kustomization = json!({
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": resources,
            "nameSuffix": self.name_suffix,
            "patches": [{
                "target": { "group": "kubeflow.org", "version": "v2beta1", "kind": "MPIJob", "name": BASE_JOB },
                "path": "mpijob-patch.yaml",
            }],
        });
        if let Some(ns) = &self.namespace {
            kustomization["namespace"] = json!(ns);
        }
        let header = "# Written by `bd3 launch k8s`: `kubectl apply -k` this directory, or `kubectl apply -f \
                      manifests.yaml` (the objects it renders to).\n";
        write_private(
            &dir.join("kustomization.yaml"),
            &format!("{header}{}", serde_norway::to_string(&kustomization)?),
        )?;
        write_private(&dir.join("mpijob-patch.yaml"), &serde_norway::to_string(&self.job_patch)?)?;
        for (file, object) in &self.resources {
            write_private(&dir.join(file), &serde_norway::to_string(object)?)?;
        }
        let path = dir.join("manifests.yaml");
        write_private(&path, &to_yaml_documents(manifests)?)?;
        Ok(path)
    }
}

/// The order in which the objects are listed (and applied): what the job mounts first.
const KIND_ORDER: [&str; 3] = ["ConfigMap", "Secret", "MPIJob"];

#[derive(Deserialize)]
struct Kustomization {
    #[serde(default)]
    resources: Vec<String>,
    #[serde(default)]
    configurations: Vec<String>,
}

#[derive(Deserialize)]
struct NameReferenceConfig {
    #[serde(rename = "nameReference")]
    name_reference: Vec<NameReference>,
}

#[derive(Deserialize)]
struct NameReference {
    kind: String,
    #[serde(rename = "fieldSpecs")]
    field_specs: Vec<FieldSpec>,
}

#[derive(Deserialize)]
struct FieldSpec {
    kind: String,
    path: String,
}

fn replace(path: &str, value: Value) -> Value {
    json!({ "op": "replace", "path": path, "value": value })
}

fn test(path: &str, value: Value) -> Value {
    json!({ "op": "test", "path": path, "value": value })
}

/// Applies RFC 6902 `test` and `replace` operations (the ones the overlay uses).
pub fn apply_json_patch(target: &mut Value, ops: &[Value]) -> Result<()> {
    for op in ops {
        let path = op["path"].as_str().context("a patch operation without a path")?;
        let current = target.pointer_mut(path).with_context(|| format!("{path}: no such field to patch"))?;
        match op["op"].as_str() {
            Some("replace") => *current = op["value"].clone(),
            Some("test") => ensure!(*current == op["value"], "{path} is {current}, the patch expects {}", op["value"]),
            other => bail!("patch operation {other:?} at {path}: only test and replace are supported"),
        }
    }
    Ok(())
}

/// Renames the string at `path` (kustomize's field path: lists are walked element by element).
fn rename_at(value: &mut Value, path: &[&str], rename: &dyn Fn(&str) -> Option<String>) {
    match (value, path.split_first()) {
        (Value::Array(items), _) => items.iter_mut().for_each(|item| rename_at(item, path, rename)),
        (Value::Object(map), Some((key, rest))) => {
            if let Some(child) = map.get_mut(*key) {
                rename_at(child, rest, rename);
            }
        }
        (value @ Value::String(_), None) => {
            if let Some(new) = value.as_str().and_then(rename) {
                *value = json!(new);
            }
        }
        _ => {}
    }
}

fn name_of(object: &Value) -> &str {
    object["metadata"]["name"].as_str().unwrap_or_default()
}

fn kind_and_name(object: &Value) -> (String, String) {
    (object["kind"].as_str().unwrap_or_default().to_string(), name_of(object).to_string())
}

/// The `NAME=value` lines of a credentials file (blank lines and `#` comments skipped).
fn read_credentials(path: &Path) -> Result<BTreeMap<String, String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading --credentials {}", path.display()))?;
    let mut vars = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = || format!("{}:{}", path.display(), i + 1);
        let (name, value) = line.split_once('=').with_context(|| format!("{}: expected NAME=value", at()))?;
        let well_formed = name.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
        ensure!(
            well_formed && CREDENTIAL_PREFIXES.iter().any(|p| name.starts_with(p) && name.len() > p.len()),
            "{}: {name:?} is not an object-store variable (expected a name starting with {})",
            at(),
            CREDENTIAL_PREFIXES.join(", ")
        );
        ensure!(!value.is_empty(), "{}: {name} has an empty value", at());
        ensure!(vars.insert(name.to_string(), value.to_string()).is_none(), "{}: {name} is set twice", at());
    }
    ensure!(!vars.is_empty(), "{}: no NAME=value line", path.display());
    Ok(vars)
}

fn read_yaml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_norway::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Every document of a YAML file.
pub fn read_yaml_documents(path: &Path) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse_yaml_documents(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Every document of a YAML stream (empty documents skipped).
pub fn parse_yaml_documents(text: &str) -> Result<Vec<Value>> {
    let mut docs = Vec::new();
    for document in serde_norway::Deserializer::from_str(text) {
        let value = Value::deserialize(document)?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

fn to_yaml_documents(objects: &[Value]) -> Result<String> {
    let docs: Vec<String> = objects.iter().map(serde_norway::to_string).collect::<Result<_, _>>()?;
    Ok(docs.iter().map(|d| format!("---\n{d}")).collect())
}

/// Written readable by the owner only: the Secret (and the manifests holding it) among them.
fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(text.as_bytes()).with_context(|| format!("writing {}", path.display()))
}

/// `to` relative to the directory `from` (both made absolute first), as kustomize wants a base.
fn relative_path(from: &Path, to: &Path) -> Result<PathBuf> {
    let canonical = |p: &Path| p.canonicalize().with_context(|| format!("resolving {}", p.display()));
    let (from, to) = (canonical(from)?, canonical(to)?);
    let (from, to): (Vec<Component>, Vec<Component>) = (from.components().collect(), to.components().collect());
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut rel: PathBuf = std::iter::repeat_n(Component::ParentDir, from.len() - common).collect();
    rel.extend(&to[common..]);
    Ok(rel)
}

/// An RFC 1123 label: what Kubernetes accepts as a namespace and (with dots) an object name.
fn is_dns_label(s: &str) -> bool {
    let ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    (1..=63).contains(&s.len()) && s.chars().all(|c| ok(c) || c == '-') && s.starts_with(ok) && s.ends_with(ok)
}

fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// A Kubernetes quantity such as `32Gi`, `512M` or `1.5Gi`.
fn is_quantity(s: &str) -> bool {
    let digits_end = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (number, suffix) = s.split_at(digits_end);
    let suffixes = ["", "k", "M", "G", "T", "P", "E", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    number.parse::<f64>().is_ok_and(|n| n > 0.0) && suffixes.contains(&suffix)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_quantities_are_checked() {
        assert!(is_dns_label("small") && is_dns_label("run-2"));
        assert!(!is_dns_label("Small") && !is_dns_label("a_b") && !is_dns_label("-a") && !is_dns_label(""));
        assert!(is_quantity("32Gi") && is_quantity("512M") && is_quantity("1.5Gi"));
        assert!(!is_quantity("32GB") && !is_quantity("Gi") && !is_quantity("0"));
    }

    #[test]
    fn json_patch_replaces_and_tests() {
        let mut v = json!({ "a": [{ "b": 1 }], "c/d": 2 });
        apply_json_patch(&mut v, &[test("/a/0/b", json!(1)), replace("/a/0/b", json!(3)), replace("/c~1d", json!(4))])
            .unwrap();
        assert_eq!(v, json!({ "a": [{ "b": 3 }], "c/d": 4 }));
        let err = apply_json_patch(&mut v, &[test("/a/0/b", json!(1))]).unwrap_err().to_string();
        assert!(err.contains("/a/0/b is 3"), "{err}");
        assert!(apply_json_patch(&mut v, &[replace("/a/1/b", json!(0))]).is_err(), "no element 1");
    }

    #[test]
    fn relative_paths_climb_to_the_common_ancestor() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("runs/x/k8s"), dir.path().join("k8s/base"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        assert_eq!(relative_path(&a, &b).unwrap(), PathBuf::from("../../../k8s/base"));
    }
}
