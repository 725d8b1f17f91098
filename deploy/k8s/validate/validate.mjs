// Validates every YAML document in deploy/k8s/*.yaml offline against the
// Kubernetes API schemas (the `kubernetes-models` classes), then checks what
// this project relies on (the agent's host access, control's hardening, the
// configs matching the mounts). Run by `cargo xtask test` (stage "k8s
// manifests") after `npm ci`; alone: `node validate.mjs [DIR]`.
//
// It first proves that it can fail: broken objects must be rejected, or the
// run fails, so a validator that passes everything cannot go unnoticed.

import { readdirSync, readFileSync } from "node:fs";
import { join, dirname, basename } from "node:path";
import { fileURLToPath } from "node:url";
import { parseAllDocuments } from "yaml";

const here = dirname(fileURLToPath(import.meta.url));
const dir = process.argv[2] ?? join(here, "..");

/** The kubernetes-models class for an apiVersion and kind, or an error. */
async function modelClass(apiVersion, kind) {
  // "v1" -> v1/Kind, "apps/v1" -> apps/v1/Kind. Anything else is not a path.
  if (typeof apiVersion !== "string" || !/^([a-z0-9.-]+\/)?v[0-9]+((alpha|beta)[0-9]+)?$/.test(apiVersion)) {
    throw new Error(`bad apiVersion ${JSON.stringify(apiVersion)}`);
  }
  if (typeof kind !== "string" || !/^[A-Z][A-Za-z0-9]*$/.test(kind)) {
    throw new Error(`bad kind ${JSON.stringify(kind)}`);
  }
  let mod;
  try {
    mod = await import(`kubernetes-models/${apiVersion}/${kind}`);
  } catch {
    throw new Error(`unknown kind ${apiVersion}/${kind} (no such Kubernetes API model)`);
  }
  const cls = mod[kind] ?? mod.default;
  if (typeof cls !== "function") throw new Error(`no model class for ${apiVersion}/${kind}`);
  return cls;
}

/** Schema-validates one object; throws with the schema's complaint. */
async function schemaCheck(obj) {
  if (obj === null || typeof obj !== "object" || Array.isArray(obj)) throw new Error("not a mapping");
  const cls = await modelClass(obj.apiVersion, obj.kind);
  new cls(obj).validate();
}

// ---- project properties ---------------------------------------------------

const AGENT_CAPS = ["BPF", "NET_ADMIN", "PERFMON", "SYS_ADMIN"];

function expect(cond, what) {
  if (!cond) throw new Error(what);
}

/** `key = "value"` at the top of a TOML text or inside [control]: enough to
 *  compare paths with the mounts (the agent parses the real thing). */
function tomlString(text, key) {
  const m = text.match(new RegExp(`^${key}\\s*=\\s*"([^"]*)"`, "m"));
  return m?.[1];
}

function mountsOf(podSpec, container) {
  return (container.volumeMounts ?? []).map((m) => ({
    ...m,
    volume: (podSpec.volumes ?? []).find((v) => v.name === m.name),
  }));
}

function under(path, mount) {
  return path === mount || path.startsWith(mount.endsWith("/") ? mount : `${mount}/`);
}

function checkDaemonSet(ds, configMaps) {
  const pod = ds.spec.template.spec;
  const name = `DaemonSet ${ds.metadata.name}`;
  expect(pod.hostNetwork === true, `${name}: hostNetwork must be true (the agent programs the node's network)`);
  expect(pod.dnsPolicy === "ClusterFirstWithHostNet", `${name}: dnsPolicy must be ClusterFirstWithHostNet`);
  expect(pod.nodeSelector?.["mesh.meshgate.io/gateway"] === "true", `${name}: nodeSelector mesh.meshgate.io/gateway: "true" missing`);
  const ru = ds.spec.updateStrategy?.rollingUpdate;
  expect(ds.spec.updateStrategy?.type === "RollingUpdate" && ru?.maxUnavailable === 1,
    `${name}: updateStrategy must be RollingUpdate with maxUnavailable 1 (failover covers one gateway)`);
  const agent = pod.containers.find((c) => c.name === "mesh-agent");
  expect(agent, `${name}: no container mesh-agent`);
  const sc = agent.securityContext ?? {};
  expect(sc.privileged !== true, `${name}: must not be privileged (capabilities instead)`);
  expect(sc.readOnlyRootFilesystem === true, `${name}: readOnlyRootFilesystem must be true`);
  const add = [...(sc.capabilities?.add ?? [])].sort();
  expect(JSON.stringify(add) === JSON.stringify(AGENT_CAPS), `${name}: capabilities.add must be ${AGENT_CAPS}, is ${add}`);
  expect(JSON.stringify(sc.capabilities?.drop) === '["ALL"]', `${name}: capabilities.drop must be [ALL]`);
  const mounts = mountsOf(pod, agent);
  const bpf = mounts.find((m) => m.mountPath === "/sys/fs/bpf");
  expect(bpf?.volume?.hostPath?.path === "/sys/fs/bpf", `${name}: /sys/fs/bpf must be the node's bpffs (hostPath)`);
  expect(bpf.mountPropagation !== "Bidirectional", `${name}: Bidirectional propagation needs a privileged container`);
  for (const m of mounts) {
    const s = m.volume?.secret;
    if (s) expect(((s.defaultMode ?? 0o644) & 0o077) === 0, `${name}: secret ${s.secretName} must be mounted 0400/0600`);
  }
  expect(agent.livenessProbe?.httpGet?.path === "/metrics", `${name}: liveness must GET /metrics`);
  const probePort = agent.livenessProbe.httpGet.port;

  // Every per-node config: its paths inside the mounts, its metrics port the probed one.
  const cmVolume = mounts.find((m) => m.volume?.configMap);
  expect(cmVolume, `${name}: no ConfigMap mounted`);
  const cm = configMaps.get(cmVolume.volume.configMap.name);
  expect(cm, `${name}: ConfigMap ${cmVolume.volume.configMap.name} is not in these manifests`);
  const args = (agent.args ?? []).join(" ");
  expect(args.includes(`--config ${cmVolume.mountPath}/$(NODE_NAME).toml`), `${name}: args must read ${cmVolume.mountPath}/$(NODE_NAME).toml`);
  const files = Object.entries(cm.data ?? {}).filter(([k]) => k.endsWith(".toml"));
  expect(files.length > 0, `${name}: ConfigMap ${cm.metadata.name} has no .toml`);
  for (const [file, text] of files) {
    const at = `${name}: ${cm.metadata.name}/${file}`;
    const state = tomlString(text, "state_dir");
    expect(state && mounts.some((m) => m.volume?.hostPath && under(state, m.mountPath)), `${at}: state_dir ${state} is not on a hostPath mount`);
    const pins = tomlString(text, "bpf_pin_dir");
    expect(pins && under(pins, "/sys/fs/bpf"), `${at}: bpf_pin_dir ${pins} is not under the bpffs mount`);
    const key = tomlString(text, "enrollment_key_file");
    expect(key && mounts.some((m) => m.volume?.secret && under(key, m.mountPath)), `${at}: enrollment_key_file ${key} is not on the Secret mount`);
    const metrics = tomlString(text, "metrics_listen");
    expect(metrics?.endsWith(`:${probePort}`) && !metrics.startsWith("127."),
      `${at}: metrics_listen ${metrics} must serve port ${probePort} beyond loopback (kubelet probes the node's address)`);
    expect(/^keep_dataplane_on_exit\s*=\s*true/m.test(text), `${at}: keep_dataplane_on_exit = true (rolling updates must not cut traffic)`);
  }
}

function checkControl(dep, configMaps) {
  const pod = dep.spec.template.spec;
  const name = `Deployment ${dep.metadata.name}`;
  expect(pod.securityContext?.runAsNonRoot === true, `${name}: runAsNonRoot must be true`);
  expect(pod.securityContext?.seccompProfile?.type === "RuntimeDefault", `${name}: seccompProfile RuntimeDefault`);
  expect((dep.spec.replicas ?? 1) >= 2, `${name}: 2 replicas on PostgreSQL`);
  const c = pod.containers.find((x) => x.name === "mesh-control");
  expect(c, `${name}: no container mesh-control`);
  const sc = c.securityContext ?? {};
  expect(sc.readOnlyRootFilesystem === true, `${name}: readOnlyRootFilesystem must be true`);
  expect(sc.allowPrivilegeEscalation === false, `${name}: allowPrivilegeEscalation must be false`);
  expect(JSON.stringify(sc.capabilities?.drop) === '["ALL"]' && !sc.capabilities?.add, `${name}: drop ALL capabilities, add none`);
  const mounts = mountsOf(pod, c);
  const cmMount = mounts.find((m) => m.volume?.configMap);
  const cm = configMaps.get(cmMount?.volume?.configMap?.name);
  expect(cm?.data?.["control.toml"], `${name}: ConfigMap with control.toml not mounted`);
  expect((c.args ?? []).join(" ").includes(`--config ${cmMount.mountPath}/control.toml`), `${name}: args must read the mounted control.toml`);
  const toml = cm.data["control.toml"];
  const url = tomlString(toml, "database_url");
  expect(url?.startsWith("postgres://"), `${name}: database_url must point at PostgreSQL (several replicas)`);
  expect(!/^postgres:\/\/[^/@]*:[^/@]*@/.test(url), `${name}: database_url must not carry the password (PGPASSWORD from a Secret)`);
  expect(c.env?.some((e) => e.name === "PGPASSWORD" && e.valueFrom?.secretKeyRef), `${name}: PGPASSWORD must come from a Secret`);
  for (const key of ["data_dir", "admin_socket"]) {
    const p = tomlString(toml, key);
    expect(p && mounts.some((m) => !m.readOnly && under(p, m.mountPath)), `${name}: ${key} ${p} is not on a writable mount`);
  }
}

// ---- self-check: the validator must be able to say no ----------------------

async function mustReject(what, fn) {
  try {
    await fn();
  } catch {
    return;
  }
  throw new Error(`self-check: ${what} was accepted; the validator would pass anything`);
}

async function selfCheck(realDaemonSet, configMaps) {
  const container = { name: "x", image: "x", ports: [{ containerPort: 80 }] };
  const ds = (spec) => ({ apiVersion: "apps/v1", kind: "DaemonSet", metadata: { name: "broken" }, spec });
  const template = { metadata: { labels: { a: "b" } }, spec: { containers: [container] } };
  // The positive control first: a minimal valid object passes.
  await schemaCheck(ds({ selector: { matchLabels: { a: "b" } }, template }));
  await mustReject("a DaemonSet without selector", () => schemaCheck(ds({ template })));
  await mustReject('a container port "abc"', () =>
    schemaCheck(ds({ selector: { matchLabels: { a: "b" } }, template: { ...template, spec: { containers: [{ ...container, ports: [{ containerPort: "abc" }] }] } } })));
  await mustReject("an unknown kind", () => schemaCheck({ apiVersion: "apps/v1", kind: "Gizmo", metadata: { name: "g" } }));
  const noHost = structuredClone(realDaemonSet);
  noHost.spec.template.spec.hostNetwork = false;
  await mustReject("the agent DaemonSet without hostNetwork", () => checkDaemonSet(noHost, configMaps));
  const bidi = structuredClone(realDaemonSet);
  const agent = bidi.spec.template.spec.containers.find((c) => c.name === "mesh-agent");
  agent.volumeMounts.find((m) => m.mountPath === "/sys/fs/bpf").mountPropagation = "Bidirectional";
  await mustReject("bpffs with Bidirectional propagation", () => checkDaemonSet(bidi, configMaps));
}

// ---- main -----------------------------------------------------------------

const files = readdirSync(dir).filter((f) => f.endsWith(".yaml")).sort();
const problems = [];
const objects = [];
for (const file of files) {
  // YAML 1.1 as Kubernetes reads it (sigs.k8s.io/yaml): `defaultMode: 0400`
  // is octal there, decimal 400 in YAML 1.2.
  const docs = parseAllDocuments(readFileSync(join(dir, file), "utf8"), { version: "1.1" });
  for (const [i, doc] of docs.entries()) {
    const where = `${file} document ${i}`;
    if (doc.errors.length) {
      problems.push(`${where}: YAML: ${doc.errors.map((e) => e.message).join("; ")}`);
      continue;
    }
    const obj = doc.toJS();
    if (obj === null) continue; // an empty document (a trailing ---)
    const id = `${obj?.kind ?? "?"}/${obj?.metadata?.name ?? "?"}`;
    try {
      await schemaCheck(obj);
      objects.push({ where: `${where} (${id})`, obj });
    } catch (e) {
      problems.push(`${where} (${id}): ${e.message}`);
    }
  }
}
expect(files.length > 0 || problems.length > 0, `no *.yaml in ${dir}`);

const configMaps = new Map(objects.filter((o) => o.obj.kind === "ConfigMap").map((o) => [o.obj.metadata.name, o.obj]));
const checks = { DaemonSet: checkDaemonSet, Deployment: checkControl };
const seen = new Set();
for (const { where, obj } of objects) {
  if (obj.kind !== "Namespace" && obj.metadata?.namespace !== "mesh-system") problems.push(`${where}: namespace must be mesh-system`);
  const check = checks[obj.kind];
  if (!check) continue;
  seen.add(obj.kind);
  try {
    check(obj, configMaps);
  } catch (e) {
    problems.push(`${where}: ${e.message}`);
  }
}
for (const kind of Object.keys(checks)) if (!seen.has(kind)) problems.push(`no ${kind} in ${dir}`);

const realDs = objects.find((o) => o.obj.kind === "DaemonSet")?.obj;
if (realDs) {
  try {
    await selfCheck(realDs, configMaps);
  } catch (e) {
    problems.push(e.message);
  }
}

for (const p of problems) console.error(`k8s: ${p}`);
if (problems.length) {
  console.error(`k8s: ${problems.length} problem(s) in ${basename(dir)}/*.yaml`);
  process.exit(1);
}
console.log(`k8s: ${objects.length} objects in ${files.length} files valid (${files.join(", ")}); self-check rejected the broken ones`);
