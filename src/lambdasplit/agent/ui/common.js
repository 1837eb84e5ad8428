// What the web UI's pages share: element lookup, byte counts for people, and reading server-sent events.
"use strict";
const $ = (id) => document.getElementById(id);

function bytes(n) {
  if (n < 1024) return n + " B";
  if (n < 1048576) return (n / 1024).toFixed(1) + " KiB";
  return (n / 1048576).toFixed(2) + " MiB";
}

// Read a streamed response's server-sent events: onData(obj) for each JSON `data:` line ([DONE] ends nothing
// here: the stream's end does). An error event ({"error": ...}) is thrown with its message.
async function readEvents(res, onData) {
  if (!res.ok) throw new Error((await res.json()).error.message);
  const reader = res.body.getReader(), decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const data = buffer.slice(0, cut).split("\n").find((l) => l.startsWith("data: "));
      buffer = buffer.slice(cut + 2);
      if (!data || data === "data: [DONE]") continue;
      const obj = JSON.parse(data.slice(6));
      if (obj.error) throw new Error(obj.error.message);
      onData(obj);
    }
  }
}

// The agent's info, then its network feed: onNetwork(event) for a hello with the totals and each event after.
async function followNetwork(onNetwork) {
  const info = await (await fetch("/v1/lambdasplit/info")).json();
  onNetwork({ type: "hello", totals: info.totals });
  const es = new EventSource("/v1/lambdasplit/network");
  es.onmessage = (e) => onNetwork(JSON.parse(e.data));
  return info;
}
