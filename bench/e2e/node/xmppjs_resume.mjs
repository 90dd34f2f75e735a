// Resumption speed of xmpp.js 0.14, as bench/e2e/xmppsm_resume.lua measures xmppsm's: the fault
// proxy (spec/helpers/proxy_main.lua, started here) holds one sent message, then resets the
// link; measured per cut: "disconnect" -> stream management "resumed", and cut -> the held
// message acknowledged ("ack") after its re-sending. `delay` sets xmpp.reconnect.delay (ms;
// omitted: its default, 1000).
//
//   NODE_EXTRA_CA_CERTS=ca.pem node bench/e2e/node/xmppjs_resume.mjs host=127.0.0.1 port=5222 \
//     domain=d cuts=20 [delay=0]
import { client, xml } from "@xmpp/client";
import { spawn } from "node:child_process";
import net from "node:net";
import { performance } from "node:perf_hooks";

const a = {};
for (const arg of process.argv.slice(2)) {
  const m = arg.match(/^(\w+)=(.*)$/);
  if (m) a[m[1]] = /^-?\d+(\.\d+)?$/.test(m[2]) ? Number(m[2]) : m[2];
}
const CUTS = a.cuts ?? 20;
const now = () => performance.now() / 1000;
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
function percentile(list, p) {
  if (list.length === 0) return 0;
  const s = Float64Array.from(list).sort();
  return s[Math.max(0, Math.min(s.length - 1, Math.ceil((p / 100) * s.length) - 1))];
}

// The proxy: a child process; one control connection, one line per command, "OK ..." back.
const proxyProc = spawn("lua5.4", ["spec/helpers/proxy_main.lua", a.host, String(a.port), String(process.pid), "0"], {
  stdio: ["ignore", "pipe", "ignore"],
});
const [listenPort, controlPort] = await new Promise((resolve, reject) => {
  let buf = "";
  proxyProc.stdout.on("data", (d) => {
    buf += d;
    const m = buf.match(/READY (\d+) (\d+)/);
    if (m) resolve([Number(m[1]), Number(m[2])]);
  });
  proxyProc.on("exit", () => reject(new Error("proxy exited")));
});
const ctl = net.connect(controlPort, "127.0.0.1");
await new Promise((resolve) => ctl.once("connect", resolve));
let ctlBuf = "";
const waiting = [];
ctl.on("data", (d) => {
  ctlBuf += d;
  let i;
  while ((i = ctlBuf.indexOf("\n")) >= 0) {
    const line = ctlBuf.slice(0, i);
    ctlBuf = ctlBuf.slice(i + 1);
    waiting.shift()?.(line);
  }
});
function command(line) {
  return new Promise((resolve, reject) => {
    waiting.push((reply) => (reply.startsWith("OK") ? resolve(reply) : reject(new Error(reply))));
    ctl.write(line + "\n");
  });
}

const xmpp = client({
  service: `xmpp://127.0.0.1:${listenPort}`,
  domain: a.domain,
  resource: "resume",
  username: "alice",
  password: "pw-alice",
});
if (a.delay !== undefined) xmpp.reconnect.delay = a.delay;
xmpp.on("error", () => {});

let noticed = null, resumedAt = null, resumes = 0, onlines = 0;
xmpp.on("disconnect", () => { noticed ??= now(); });
xmpp.on("online", () => { onlines++; });
xmpp.streamManagement.on("resumed", () => { resumedAt ??= now(); resumes++; });
const acked = new Map();
xmpp.streamManagement.on("ack", (st) => {
  const body = st.getChildText?.("body");
  if (body) acked.set(body, now());
});

async function waitFor(cond, seconds, what) {
  const deadline = now() + seconds;
  while (!cond()) {
    if (now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(1);
  }
}

await xmpp.start();
await waitFor(() => xmpp.streamManagement.enabled, 5, "stream management");
const toResumed = [], toAcked = [];
for (let i = 1; i <= CUTS; i++) {
  await waitFor(() => xmpp.streamManagement.outbound_q.length === 0, 10, "the queue to drain");
  noticed = null;
  resumedAt = null;
  await command("silence");
  const body = `r${i}`;
  xmpp.send(xml("message", { to: `alice@${a.domain}/resume`, type: "chat" }, xml("body", {}, body))).catch(() => {});
  await sleep(20);
  const cutAt = now();
  await command("cut rst");
  await command("resume");
  await waitFor(() => acked.has(body) && resumedAt !== null, 30, `resumption ${i}`);
  toResumed.push(resumedAt - noticed);
  toAcked.push(acked.get(body) - cutAt);
  process.stderr.write(`cut ${i}: noticed->resumed ${((resumedAt - noticed) * 1000).toFixed(2)} ms, ` +
    `cut->acked ${((acked.get(body) - cutAt) * 1000).toFixed(2)} ms\n`);
}
const r = {
  impl: a.delay === undefined ? "xmppjs_default" : `xmppjs_delay${a.delay}`,
  cuts: CUTS, resumes, new_sessions: onlines - 1,
  resumed_p50_ms: percentile(toResumed, 50) * 1000, resumed_p99_ms: percentile(toResumed, 99) * 1000,
  acked_p50_ms: percentile(toAcked, 50) * 1000, acked_p99_ms: percentile(toAcked, 99) * 1000,
};
process.stdout.write("RESULT " + Object.keys(r).sort().map((k) => {
  const v = r[k];
  return `${k}=${typeof v === "number" && !Number.isInteger(v) ? Number(v.toPrecision(6)) : v}`;
}).join(" ") + "\n");
xmpp.reconnect.stop();
await xmpp.stop().catch(() => {});
ctl.end("quit\n");
proxyProc.kill();
process.exit(0);
