// End-to-end workload for xmpp.js 0.14 (@xmpp/client), the same as bench/e2e/xmppsm_client.lua:
// one account sends N chat messages (to itself, or to a second account connected from this same
// process), at most `window` unacknowledged at a time; done when every message has arrived and
// every one is acknowledged by stream management (its "ack" event). Prints one RESULT line.
//
//   NODE_EXTRA_CA_CERTS=ca.pem node bench/e2e/node/xmppjs_client.mjs host=127.0.0.1 port=5222 \
//     domain=d prosody_pid=123 to=self|other n=20000 window=1000
import { client, xml } from "@xmpp/client";
import { readFileSync } from "node:fs";
import { performance } from "node:perf_hooks";

const a = {};
for (const arg of process.argv.slice(2)) {
  const m = arg.match(/^(\w+)=(.*)$/);
  if (m) a[m[1]] = /^-?\d+(\.\d+)?$/.test(m[2]) ? Number(m[2]) : m[2];
}
const N = a.n ?? 20000;
const WINDOW = a.window ?? 1000;
const now = () => performance.now() / 1000;

function procCpu(pid) {
  try {
    const line = readFileSync(`/proc/${pid}/stat`, "utf8");
    const f = line.slice(line.lastIndexOf(")") + 2).split(" ");
    return (Number(f[11]) + Number(f[12])) / 100;
  } catch {
    return null;
  }
}
function peakRssKib() {
  const m = readFileSync("/proc/self/status", "utf8").match(/VmHWM:\s+(\d+)/);
  return Number(m[1]);
}
function percentile(list, p) {
  if (list.length === 0) return 0;
  const s = Float64Array.from(list).sort();
  return s[Math.max(0, Math.min(s.length - 1, Math.ceil((p / 100) * s.length) - 1))];
}

function newClient(user) {
  const c = client({
    service: `xmpp://${a.host}:${a.port}`,
    domain: a.domain,
    resource: "bench",
    username: user,
    password: `pw-${user}`,
  });
  c.on("error", (err) => process.stderr.write(`xmpp.js ${user} error: ${err}\n`));
  return c;
}

const sender = newClient("alice");
const receiver = a.to === "other" ? newClient("bob") : sender;
const target = `${a.to === "other" ? "bob" : "alice"}@${a.domain}/bench`;

let sent = 0, acked = 0, arrived = 0;
const tSent = new Float64Array(N + 1);
const latAck = [], latArr = [];
let t0, cpu0, pcpu0, finished = false;

receiver.on("stanza", (st) => {
  if (!st.is("message")) return;
  const body = st.getChildText("body");
  const i = body ? Number(body.slice(1)) : NaN;
  if (i > 0 && tSent[i] > 0) {
    arrived++;
    latArr.push(now() - tSent[i]);
    check();
  }
});

sender.streamManagement.on("ack", (st) => {
  if (!st.is("message")) return;
  const i = Number(st.getChildText("body").slice(1));
  acked++;
  latAck.push(now() - tSent[i]);
  schedulePump();
  check();
});

let pumpScheduled = false;
function schedulePump() {
  if (pumpScheduled) return;
  pumpScheduled = true;
  setImmediate(() => {
    pumpScheduled = false;
    pump();
  });
}
function pump() {
  while (sent < N && sent - acked < WINDOW) {
    sent++;
    tSent[sent] = now();
    sender
      .send(xml("message", { to: target, type: "chat" }, xml("body", {}, `b${sent}`)))
      .catch((err) => process.stderr.write(`send failed: ${err}\n`));
  }
}

async function check() {
  if (finished || acked < N || arrived < N) return;
  finished = true;
  const t1 = now();
  const cpu = process.cpuUsage(cpu0);
  const pcpu1 = procCpu(a.prosody_pid);
  const r = {
    impl: "xmppjs", to: a.to, n: N, window: WINDOW, failed: 0,
    sm_enabled: sender.streamManagement.enabled ? 1 : 0,
    seconds: t1 - t0,
    msgs_per_s: N / (t1 - t0),
    cpu_us_per_msg: (cpu.user + cpu.system) / N,
    prosody_cpu_us_per_msg: pcpu0 != null ? ((pcpu1 - pcpu0) / N) * 1e6 : -1,
    peak_rss_kib: peakRssKib(),
    ack_p50_ms: percentile(latAck, 50) * 1000,
    ack_p99_ms: percentile(latAck, 99) * 1000,
    arrival_p50_ms: percentile(latArr, 50) * 1000,
    arrival_p99_ms: percentile(latArr, 99) * 1000,
  };
  const line = Object.keys(r).sort().map((k) => {
    const v = r[k];
    return `${k}=${typeof v === "number" && !Number.isInteger(v) ? Number(v.toPrecision(6)) : v}`;
  });
  process.stdout.write(`RESULT ${line.join(" ")}\n`);
  await Promise.allSettled([sender.stop(), receiver !== sender ? receiver.stop() : null]);
  process.exit(0);
}

setTimeout(() => {
  process.stderr.write(`timed out: sent ${sent} acked ${acked} arrived ${arrived}\n`);
  process.exit(2);
}, (a.timeout ?? 300) * 1000).unref();

await Promise.all([sender.start(), receiver !== sender ? receiver.start() : null]);
// "online" comes once the resource is bound; <enabled/> may still be on its way.
for (let i = 0; i < 500 && !sender.streamManagement.enabled; i++) {
  await new Promise((resolve) => setTimeout(resolve, 10));
}
if (!sender.streamManagement.enabled) {
  process.stderr.write("stream management is not enabled\n");
  process.exit(3);
}
t0 = now();
cpu0 = process.cpuUsage();
pcpu0 = procCpu(a.prosody_pid);
pump();
