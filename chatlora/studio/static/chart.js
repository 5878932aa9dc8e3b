"use strict";
// A line chart on a canvas, enough for loss curves: several named series of (x, y) points, axes with a few ticks.
// (About 80 lines instead of a charting library: the page ships whole in the package, with no CDN.)
class LineChart {
  constructor(canvas, series) {
    this.canvas = canvas;
    this.series = series.map((s) => ({...s, points: []}));
  }
  clear() { this.series.forEach((s) => { s.points = []; }); this.draw(); }
  add(name, x, y) {
    const s = this.series.find((t) => t.name === name);
    if (s && Number.isFinite(x) && Number.isFinite(y)) { s.points.push([x, y]); this.draw(); }
  }
  count() { return this.series.reduce((n, s) => n + s.points.length, 0); }
  draw() {
    const c = this.canvas, g = c.getContext("2d"), W = c.width, H = c.height;
    const pad = {l: 48, r: 12, t: 12, b: 28};
    g.clearRect(0, 0, W, H);
    const all = this.series.flatMap((s) => s.points);
    g.font = "11px system-ui, sans-serif";
    if (!all.length) {
      g.fillStyle = "#999";
      g.fillText("the loss appears here as the run logs it", pad.l, H / 2);
      return;
    }
    let [x0, x1] = [Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0]))];
    let [y0, y1] = [Math.min(...all.map((p) => p[1])), Math.max(...all.map((p) => p[1]))];
    if (x1 === x0) { x0 -= 1; x1 += 1; }
    if (y1 === y0) { y0 -= 0.5; y1 += 0.5; }
    const span = y1 - y0; y0 -= span * 0.05; y1 += span * 0.05;
    const X = (x) => pad.l + (x - x0) / (x1 - x0) * (W - pad.l - pad.r);
    const Y = (y) => H - pad.b - (y - y0) / (y1 - y0) * (H - pad.t - pad.b);
    g.strokeStyle = "#ddd"; g.fillStyle = "#666"; g.lineWidth = 1;
    for (let i = 0; i <= 4; i++) {
      const y = y0 + (y1 - y0) * i / 4;
      g.beginPath(); g.moveTo(pad.l, Y(y)); g.lineTo(W - pad.r, Y(y)); g.stroke();
      g.fillText(y.toFixed(3), 4, Y(y) + 4);
    }
    const xticks = Math.min(6, Math.round(x1 - x0));
    for (let i = 0; i <= xticks; i++) {
      const x = x0 + (x1 - x0) * i / xticks;
      g.fillText(String(Math.round(x)), X(x) - 6, H - 10);
    }
    g.fillText("step", W - pad.r - 26, H - 10);
    let lx = pad.l + 8;
    for (const s of this.series) {
      if (!s.points.length) continue;
      g.strokeStyle = s.color; g.fillStyle = s.color; g.lineWidth = 2;
      g.beginPath();
      s.points.forEach(([x, y], i) => (i ? g.lineTo(X(x), Y(y)) : g.moveTo(X(x), Y(y))));
      g.stroke();
      s.points.forEach(([x, y]) => { g.beginPath(); g.arc(X(x), Y(y), 2.5, 0, 7); g.fill(); });
      g.fillText(s.name, lx, pad.t + 10); lx += g.measureText(s.name).width + 16;
    }
  }
}
