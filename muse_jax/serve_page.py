"""The page `muse_jax.serve` shows at `/`: HTML with inline CSS and JS, no external assets.

`__DEFAULTS__` is replaced by the server with a JSON object: guidance_scale, num_steps,
num_images, max_images, image_size.
"""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>muse_jax</title>
<style>
  :root { color-scheme: light; --fg: #1d2330; --muted: #5b6475; --line: #d5d9e0; --accent: #2f5fd0; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 15px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--fg);
         background: #f4f5f7; }
  header { padding: 14px 24px; background: #1d2330; color: #fff; }
  header h1 { margin: 0; font-size: 18px; font-weight: 600; }
  header span { color: #aab3c5; font-size: 13px; margin-left: 8px; }
  main { display: flex; gap: 24px; padding: 20px 24px; align-items: flex-start; flex-wrap: wrap; }
  form { flex: 0 0 340px; background: #fff; border: 1px solid var(--line); border-radius: 8px;
         padding: 16px; }
  label { display: block; font-size: 13px; color: var(--muted); margin: 10px 0 4px; }
  input[type=text], input[type=number], textarea { width: 100%; padding: 7px 9px; font: inherit;
         border: 1px solid var(--line); border-radius: 5px; background: #fff; color: var(--fg); }
  textarea { resize: vertical; min-height: 56px; }
  .row { display: grid; grid-template-columns: 1fr 1fr; gap: 0 12px; }
  button { margin-top: 14px; padding: 8px 16px; font: inherit; font-weight: 600; border: 0;
           border-radius: 5px; background: var(--accent); color: #fff; cursor: pointer; }
  button.secondary { background: #4b5568; }
  button:disabled { opacity: .5; cursor: wait; }
  fieldset { border: 1px solid var(--line); border-radius: 6px; margin: 16px 0 0; padding: 4px 12px 12px; }
  legend { font-size: 13px; color: var(--muted); padding: 0 4px; }
  input[type=file] { font-size: 13px; width: 100%; }
  #error { margin-top: 12px; color: #b3261e; font-weight: 600; min-height: 1.2em; }
  #error:empty { display: none; }
  #status { margin-top: 8px; color: var(--muted); font-size: 13px; min-height: 1.2em; }
  section { flex: 1 1 420px; min-width: 0; }
  #grid { display: block; max-width: 100%; image-rendering: pixelated; border-radius: 4px;
          background: #40444c; }
  #grid:not([src]) { display: none; }
  #placeholder { color: var(--muted); padding: 40px 0; }
  #links { margin-top: 8px; font-size: 13px; color: var(--muted); }
  #links a { color: var(--accent); margin-right: 8px; }
  .previews { display: flex; gap: 8px; margin-top: 8px; }
  .previews img { width: 64px; height: 64px; object-fit: cover; image-rendering: pixelated;
                  border: 1px solid var(--line); }
  .previews img:not([src]) { display: none; }
</style>
</head>
<body>
<header><h1>muse_jax <span id="model"></span></h1></header>
<main>
<form id="form" autocomplete="off" novalidate>
  <label for="prompt">Prompt</label>
  <textarea id="prompt" placeholder="a large red circle in the center"></textarea>
  <label for="negative_prompt">Negative prompt (empty: the model's)</label>
  <input type="text" id="negative_prompt">
  <div class="row">
    <div><label for="guidance_scale">Guidance scale</label>
      <input type="number" id="guidance_scale" step="0.5" min="0"></div>
    <div><label for="num_steps">Steps</label>
      <input type="number" id="num_steps" step="1" min="1"></div>
    <div><label for="seed">Seed</label>
      <input type="number" id="seed" step="1" min="0" value="0"></div>
    <div><label for="num_images">Images</label>
      <input type="number" id="num_images" step="1" min="1"></div>
  </div>
  <button type="submit" id="generate">Generate</button>
  <fieldset>
    <legend>Inpainting (mask: white = re-generate)</legend>
    <label for="image">Image</label><input type="file" id="image" accept="image/*">
    <label for="mask">Mask</label><input type="file" id="mask" accept="image/*">
    <div class="previews"><img id="image_preview" alt="image"><img id="mask_preview" alt="mask"></div>
    <button type="button" class="secondary" id="inpaint">Inpaint</button>
  </fieldset>
  <div id="error" role="alert"></div>
  <div id="status"></div>
</form>
<section>
  <div id="placeholder">Write a prompt and press Generate.</div>
  <img id="grid" alt="generated images">
  <div id="links"></div>
</section>
</main>
<script>
const D = __DEFAULTS__;
const $ = (id) => document.getElementById(id);
$("guidance_scale").value = D.guidance_scale;
$("num_steps").value = D.num_steps;
$("num_images").value = D.num_images;
$("num_images").max = D.max_images;
$("model").textContent = D.image_size + "\\u00d7" + D.image_size + ", at most " + D.max_images +
  " images a request";

function num(id) {
  const v = $(id).value.trim();
  return v === "" ? null : Number(v);
}
function settings() {
  return {
    prompt: $("prompt").value,
    negative_prompt: $("negative_prompt").value,
    guidance_scale: num("guidance_scale"),
    num_steps: num("num_steps"),
    seed: num("seed"),
    num_images: num("num_images"),
  };
}
function readFile(id) {
  const f = $(id).files[0];
  if (!f) return Promise.resolve(null);
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(r.result);
    r.onerror = () => reject(new Error("cannot read " + f.name));
    r.readAsDataURL(f);
  });
}
for (const id of ["image", "mask"]) {
  $(id).addEventListener("change", async () => {
    const url = await readFile(id);
    if (url) $(id + "_preview").src = url; else $(id + "_preview").removeAttribute("src");
  });
}
function busy(on, text) {
  $("generate").disabled = on;
  $("inpaint").disabled = on;
  $("status").textContent = text || "";
}
async function submit(path, body) {
  $("error").textContent = "";
  busy(true, path.endsWith("inpaint") ? "Inpainting\\u2026" : "Generating\\u2026");
  try {
    const resp = await fetch(path, {
      method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body),
    });
    let data;
    try { data = await resp.json(); } catch (e) { data = {error: "HTTP " + resp.status}; }
    if (!resp.ok) throw new Error(data.error || ("HTTP " + resp.status));
    $("grid").src = data.grid;
    $("placeholder").style.display = "none";
    $("links").innerHTML = "";
    data.images.forEach((url, i) => {
      const a = document.createElement("a");
      a.href = url; a.download = "muse_" + String(i).padStart(3, "0") + ".png";
      a.textContent = "image " + (i + 1);
      $("links").appendChild(a);
    });
    window.lastResult = data;
    busy(false, data.images.length + " images in " + data.seconds.toFixed(2) + " s");
  } catch (e) {
    $("error").textContent = e.message;
    busy(false, "");
  }
}
$("form").addEventListener("submit", (ev) => { ev.preventDefault(); submit("/api/generate", settings()); });
$("prompt").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("form").requestSubmit(); }
});
$("inpaint").addEventListener("click", async () => {
  let image, mask;
  try { [image, mask] = await Promise.all([readFile("image"), readFile("mask")]); }
  catch (e) { $("error").textContent = e.message; return; }
  if (!image || !mask) { $("error").textContent = "Choose an image and a mask to inpaint."; return; }
  submit("/api/inpaint", Object.assign(settings(), {image: image, mask: mask}));
});
</script>
</body>
</html>
"""
