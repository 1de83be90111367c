// Front-end of `kandinsky serve`: plain JavaScript, no dependencies.
//
// Layout of this file:
//   1. small helpers (DOM, API, images)
//   2. settings (models, samplers, aspect ratio, seed)
//   3. job runner (POST /api/v1/jobs + EventSource progress) and gallery
//   4. the tabs: text to image, image to image, mixing
//   5. the infinite canvas editor (window.editor)
//   6. start-up
'use strict';

(function () {
  // ---------------------------------------------------------------------
  // 1. Helpers
  // ---------------------------------------------------------------------

  const $ = (id) => document.getElementById(id);

  function el(tag, attrs, children) {
    const node = document.createElement(tag);
    if (attrs) {
      for (const [k, v] of Object.entries(attrs)) {
        if (v === undefined || v === null) continue;
        if (k === 'class') node.className = v;
        else if (k === 'text') node.textContent = v;
        else if (k === 'dataset') Object.assign(node.dataset, v);
        else if (k.startsWith('on')) node.addEventListener(k.slice(2), v);
        else node.setAttribute(k, v);
      }
    }
    for (const c of children || []) node.append(c);
    return node;
  }

  const pngUrl = (b64) => 'data:image/png;base64,' + b64;

  /** Reads the server's {"error": "..."} body, falling back to the HTTP status. */
  async function errorMessage(resp) {
    let msg = '';
    try {
      const text = await resp.text();
      try {
        const body = JSON.parse(text);
        msg = body && body.error ? String(body.error) : text;
      } catch (_) {
        msg = text;
      }
    } catch (_) { /* ignore */ }
    msg = (msg || '').trim();
    return msg || `The server answered ${resp.status} ${resp.statusText || ''}`.trim();
  }

  // With `kandinsky serve --api-token T` every API call needs `Authorization: Bearer T`: the
  // page asks once, keeps it in localStorage and sends it (EventSource cannot send headers, so
  // the event stream gets it as `?token=`).
  const tokenKey = 'kandinsky-api-token';
  const token = () => localStorage.getItem(tokenKey) || '';

  async function apiFetch(url, opts) {
    const withToken = () => {
      const o = Object.assign({}, opts || {});
      o.headers = Object.assign({}, o.headers || {});
      if (token()) o.headers.Authorization = 'Bearer ' + token();
      return o;
    };
    let resp = await fetch(url, withToken());
    if (resp.status === 401) {
      const t = window.prompt('This server needs an API token (kandinsky serve --api-token):', '');
      if (t) {
        localStorage.setItem(tokenKey, t.trim());
        resp = await fetch(url, withToken());
      }
    }
    return resp;
  }

  async function getJSON(url) {
    const resp = await apiFetch(url, { headers: { Accept: 'application/json' } });
    if (!resp.ok) throw new Error(await errorMessage(resp));
    return resp.json();
  }

  function loadImage(src) {
    return new Promise((resolve, reject) => {
      const img = new Image();
      img.onload = () => resolve(img);
      img.onerror = () => reject(new Error('The file could not be read as an image.'));
      img.src = src;
    });
  }

  function readFileAsDataURL(file) {
    return new Promise((resolve, reject) => {
      const r = new FileReader();
      r.onload = () => resolve(r.result);
      r.onerror = () => reject(new Error('The file could not be read.'));
      r.readAsDataURL(file);
    });
  }

  function makeCanvas(w, h) {
    const c = document.createElement('canvas');
    c.width = Math.max(1, Math.round(w));
    c.height = Math.max(1, Math.round(h));
    return c;
  }

  // Images larger than this (longest side) are scaled down before upload;
  // the server resizes them to width×height anyway, this only keeps requests small.
  const MAX_UPLOAD_SIDE = 2048;

  /** Any image file -> {url: PNG data URL, img: HTMLImageElement}. */
  async function fileToPng(file) {
    if (!file) return null;
    const img = await loadImage(await readFileAsDataURL(file));
    const scale = Math.min(1, MAX_UPLOAD_SIDE / Math.max(img.naturalWidth, img.naturalHeight));
    const c = makeCanvas(img.naturalWidth * scale, img.naturalHeight * scale);
    c.getContext('2d').drawImage(img, 0, 0, c.width, c.height);
    const url = c.toDataURL('image/png');
    return { url, img: await loadImage(url) };
  }

  // ---------------------------------------------------------------------
  // 2. Settings
  // ---------------------------------------------------------------------

  const state = {
    models: [],
    model: null,          // the selected model object from /api/v1/models
    lastSeed: null,       // seed of the last finished image (#seed-reuse)
    job: null,            // the running job, see runJob()
    i2iImage: null,       // PNG data URL of the image-to-image input
    hintImage: null,      // PNG data URL of the ControlNet hint
  };

  function showError(msg) {
    const box = $('error');
    box.textContent = msg;
    box.hidden = !msg;
  }
  const clearError = () => showError('');

  function nativeSize() {
    return (state.model && Number(state.model.native_size)) || 512;
  }

  function supports(mode) {
    return !!(state.model && Array.isArray(state.model.modes) && state.model.modes.includes(mode));
  }

  /**
   * Width/height for an aspect ratio "a:b": keep the area close to native²,
   * round both sides to multiples of 64 (at least 64). Tiny models (native ≤ 64)
   * would round everything to 64×64, so they get a fixed table instead.
   */
  function sizeForAspect(ratio, native) {
    const [a, b] = ratio.split(':').map(Number);
    if (native <= 64) {
      if (a === b) return [64, 64];
      return a < b ? [64, 128] : [128, 64];
    }
    const r = Math.sqrt(a / b);
    const round64 = (v) => Math.max(64, Math.round(v / 64) * 64);
    return [round64(native * r), round64(native / r)];
  }

  function applyAspect() {
    const ratio = $('aspect').value;
    if (ratio === 'custom') return;
    const [w, h] = sizeForAspect(ratio, nativeSize());
    $('width').value = w;
    $('height').value = h;
  }

  function fillModels(models) {
    state.models = models;
    const sel = $('model');
    sel.textContent = '';
    for (const m of models) {
      sel.append(el('option', { value: m.name, text: `${m.name} (Kandinsky ${m.version}, ${m.native_size}px)` }));
    }
    const def = models.find((m) => m.default) || models[0];
    if (def) sel.value = def.name;
    onModelChange();
  }

  function onModelChange(ev) {
    // A custom size chosen for another model rarely fits the new one.
    if (ev && $('aspect').value === 'custom') $('aspect').value = '1:1';
    state.model = state.models.find((m) => m.name === $('model').value) || null;
    const m = state.model;
    $('model-info').textContent = m ? `modes: ${m.modes.join(', ')}` : '';
    applyAspect();
    // Mode-dependent UI: notes, the ControlNet block.
    $('cn-block').hidden = !supports('controlnet');
    document.querySelectorAll('[data-mode-note]').forEach((note) => {
      const mode = note.dataset.modeNote;
      const ok = supports(mode);
      note.hidden = ok || !m;
      note.textContent = ok ? '' : (mode === 'inpainting'
        ? `The model "${m && m.name}" cannot inpaint: only an empty window can be generated.`
        : `The model "${m && m.name}" does not support ${mode.replace(/_/g, ' ')}.`);
    });
    refreshButtons();
    editor.setWindowSize(nativeSize());
  }

  function fillSamplers(samplers) {
    const sel = $('sampler');
    const prev = sel.value;
    sel.textContent = '';
    for (const s of samplers) sel.append(el('option', { value: s.name, text: s.label || s.name }));
    sel.value = samplers.some((s) => s.name === prev) ? prev : (samplers[0] ? samplers[0].name : '');
  }

  function intValue(id, fallback) {
    const v = parseInt($(id).value, 10);
    return Number.isFinite(v) ? v : fallback;
  }
  function floatValue(id, fallback) {
    const v = parseFloat($(id).value);
    return Number.isFinite(v) ? v : fallback;
  }

  /** Fields shared by every request, from the side column. */
  function commonRequest() {
    const req = {
      model: $('model').value || undefined,
      width: intValue('width', nativeSize()),
      height: intValue('height', nativeSize()),
      steps: intValue('steps', 50),
      prior_steps: intValue('prior-steps', 25),
      guidance: floatValue('guidance', 4),
      num_images: Math.min(4, Math.max(1, intValue('num-images', 1))),
      sampler: $('sampler').value || 'default',
      seed: intValue('seed', -1),
    };
    const neg = $('negative').value.trim();
    if (neg) req.negative_prompt = neg;
    return req;
  }

  // ---------------------------------------------------------------------
  // 3. Jobs, progress, gallery
  // ---------------------------------------------------------------------

  // Buttons that start a job: disabled while a job runs or when the model
  // lacks the mode. The canvas button only needs text_to_image (an empty
  // window); inpainting support is checked when it is clicked.
  function refreshButtons() {
    const busy = !!state.job;
    document.querySelectorAll('.gen-button').forEach((b) => {
      const mode = b.dataset.mode;
      const ok = mode === 'canvas' ? (supports('text_to_image') || supports('inpainting')) : supports(mode);
      b.disabled = busy || !ok;
      b.title = ok ? '' : 'Not supported by this model';
    });
    $('cancel').disabled = !busy;
  }

  function setProgress(text, value) {
    $('status').textContent = text;
    $('progress-bar').value = Math.min(1, Math.max(0, value));
  }

  function describe(job) {
    const eta = job.eta_s != null && Number.isFinite(job.eta_s) ? ` · ETA ${Number(job.eta_s).toFixed(1)} s` : '';
    switch (job.state) {
      case 'queued':
        return [job.position != null ? `Queued: position ${job.position}` : 'Queued', 0];
      case 'running': {
        const steps = Math.max(1, job.steps || 1);
        const frac = Math.min(1, (job.step || 0) / steps);
        // The prior counts as the first 20 % of the bar, the decoder as the rest.
        if (job.stage === 'prior') return [`Prior ${job.step || 0}/${job.steps || 0}${eta}`, 0.2 * frac];
        if (job.stage === 'decoder') return [`Decoder ${job.step || 0}/${job.steps || 0}${eta}`, 0.2 + 0.8 * frac];
        return ['Running…', 0];
      }
      case 'done': return ['Done', 1];
      case 'failed': return ['Failed', 0];
      case 'cancelled': return ['Cancelled', 0];
      default: return [String(job.state || ''), 0];
    }
  }

  /**
   * Starts one job. `opts.onDone(result)` runs after the images were added
   * to the gallery; `opts.onPreview(dataUrl)` sees every preview.
   * Only one job runs at a time; returns false if one is already running.
   */
  async function runJob(request, opts) {
    opts = opts || {};
    if (state.job) return false;
    clearError();
    const job = { id: null, es: null, request, opts, cancelRequested: false, finished: false, errors: 0 };
    state.job = job;
    refreshButtons();
    setProgress('Submitting…', 0);

    let resp;
    try {
      resp = await apiFetch('/api/v1/jobs', {
        method: 'POST',
        headers: { 'Content-Type': 'application/json', Accept: 'application/json' },
        body: JSON.stringify(request),
      });
    } catch (e) {
      finishJob(job, 'Failed', `Could not reach the server: ${e.message}`);
      return true;
    }
    if (!resp.ok) {
      let msg = await errorMessage(resp);
      if (resp.status === 429) {
        const after = resp.headers.get('Retry-After');
        msg = `The queue is full, try again in ${after && after.trim() ? after.trim() : 'a few'} s`;
      }
      finishJob(job, 'Failed', msg);
      return true;
    }
    let created;
    try {
      created = await resp.json();
    } catch (e) {
      finishJob(job, 'Failed', 'The server sent an unreadable answer.');
      return true;
    }
    job.id = String(created.id);
    setProgress(created.position != null ? `Queued: position ${created.position}` : 'Queued', 0);
    if (job.cancelRequested) sendCancel(job);

    const es = new EventSource(`/api/v1/jobs/${encodeURIComponent(job.id)}/events` +
      (token() ? '?token=' + encodeURIComponent(token()) : ''));
    job.es = es;
    es.onmessage = (ev) => {
      job.errors = 0;
      let data;
      try { data = JSON.parse(ev.data); } catch (_) { return; }
      onJobEvent(job, data);
    };
    es.onerror = () => {
      if (job.finished) return;
      // EventSource reconnects by itself; give up when the browser closed it
      // or after several failures in a row (server gone).
      job.errors += 1;
      if (es.readyState === EventSource.CLOSED || job.errors > 5) {
        finishJob(job, 'Failed', 'Lost the connection to the server while waiting for the job.');
      }
    };
    return true;
  }

  function onJobEvent(job, data) {
    if (job.finished) return;
    const [text, value] = describe(data);
    setProgress(text, value);
    if (data.preview && (data.state === 'running' || data.state === 'queued')) {
      const url = pngUrl(data.preview);
      $('preview').src = url;
      $('preview').hidden = false;
      if (job.opts.onPreview) job.opts.onPreview(url);
    }
    if (data.state === 'done') {
      const result = data.result || { images: [] };
      addResults(result, job.request);
      finishJob(job, 'Done', null);
      if (job.opts.onDone) {
        try { job.opts.onDone(result); } catch (e) { showError(e.message); }
      }
    } else if (data.state === 'failed') {
      finishJob(job, 'Failed', data.error || 'The job failed.');
    } else if (data.state === 'cancelled') {
      finishJob(job, 'Cancelled', null);
    }
  }

  function finishJob(job, statusText, error) {
    if (job.finished) return;
    job.finished = true;
    if (job.es) job.es.close();
    if (state.job === job) state.job = null;
    setProgress(statusText, statusText === 'Done' ? 1 : 0);
    $('preview').hidden = true;
    $('preview').removeAttribute('src');
    if (error) showError(error);
    if (job.opts.onEnd) job.opts.onEnd();
    refreshButtons();
  }

  async function sendCancel(job) {
    try {
      const resp = await apiFetch(`/api/v1/jobs/${encodeURIComponent(job.id)}`, { method: 'DELETE' });
      if (!resp.ok && !job.finished) showError(await errorMessage(resp));
    } catch (e) {
      if (!job.finished) showError(`Could not cancel: ${e.message}`);
    }
  }

  function cancelJob() {
    const job = state.job;
    if (!job) return;
    setProgress('Cancelling…', $('progress-bar').value);
    if (job.id) sendCancel(job);
    else job.cancelRequested = true; // the POST is still in flight
  }

  const MODE_LABELS = {
    text_to_image: 'text to image', image_to_image: 'image to image', inpainting: 'inpainting',
    outpainting: 'outpainting', mixing: 'mixing', variations: 'variations', controlnet: 'ControlNet',
  };

  /** Adds every image of a finished job to the gallery (newest first). */
  function addResults(result, request) {
    const info = result.info || {};
    const images = result.images || [];
    const gallery = $('gallery');
    const width = result.width || info.width || request.width;
    const height = result.height || info.height || request.height;
    const mode = info.mode || request.mode;
    const prompt = info.prompt != null ? info.prompt : (request.prompt != null ? request.prompt
      : (request.inputs || []).map((i) => (i.text != null ? `“${i.text}”` : '[image]') + ` ×${i.weight}`).join(' + '));
    const steps = info.steps || request.steps;
    const sampler = info.sampler || request.sampler;
    const nodes = [];
    images.forEach((b64, i) => {
      // Per-image seeds if the server reports them, else the job's seed.
      const seed = Array.isArray(info.seeds) && info.seeds[i] != null ? info.seeds[i] : result.seed;
      const url = pngUrl(b64);
      const img = el('img', {
        // Tiny images (the 64 px model) are upscaled without blurring.
        class: 'result-image' + (width <= 128 && height <= 128 ? ' pixelated' : ''), src: url, alt: prompt || 'Generated image',
        dataset: { seed: String(seed), width: String(width), height: String(height) },
      });
      const caption = el('div', { class: 'caption' }, [
        el('div', { class: 'caption-mode', text: MODE_LABELS[mode] || String(mode || '') }),
        el('div', { class: 'caption-prompt', text: prompt || '(no prompt)' }),
        el('div', { class: 'caption-params', text: `seed ${seed} · ${width}×${height} · ${steps} steps · ${sampler}` }),
      ]);
      const actions = el('div', { class: 'result-actions' }, [
        el('a', { class: 'download', href: url, download: `kandinsky-${seed}${images.length > 1 ? '-' + (i + 1) : ''}.png`, text: 'Download' }),
        el('button', { type: 'button', class: 'use-seed', text: 'Use seed', onclick: () => { $('seed').value = seed; } }),
        el('button', { type: 'button', class: 'to-canvas', text: 'To canvas', onclick: () => sendToCanvas(url) }),
        el('button', { type: 'button', class: 'to-input', text: 'As input', onclick: () => sendToInput(url) }),
      ]);
      nodes.push(el('figure', { class: 'result' }, [img, caption, actions]));
      state.lastSeed = seed;
    });
    gallery.prepend(...nodes);
    $('gallery-empty').hidden = gallery.children.length > 0;
    $('seed-reuse').disabled = state.lastSeed == null;
  }

  async function sendToCanvas(url) {
    try {
      const img = await loadImage(url);
      showTab('panel-canvas');
      editor.placeImage(img, false);
    } catch (e) {
      showError(e.message);
    }
  }

  function sendToInput(url) {
    setI2iImage(url);
    showTab('panel-img2img');
  }

  // ---------------------------------------------------------------------
  // 4. Tabs and panels
  // ---------------------------------------------------------------------

  function showTab(panelId) {
    document.querySelectorAll('.tab').forEach((t) => {
      const on = t.dataset.panel === panelId;
      t.classList.toggle('active', on);
      t.setAttribute('aria-selected', on ? 'true' : 'false');
    });
    document.querySelectorAll('.panel').forEach((p) => { p.hidden = p.id !== panelId; });
    if (panelId === 'panel-canvas') editor.onShow();
  }

  // Text to image
  function generateTxt2Img() {
    runJob(Object.assign(commonRequest(), { mode: 'text_to_image', prompt: $('prompt').value }));
  }

  // Image to image / variations / ControlNet
  function setI2iImage(url) {
    state.i2iImage = url;
    $('i2i-thumb').src = url;
    $('i2i-thumb').hidden = false;
  }

  function needI2iImage() {
    if (!state.i2iImage) {
      showError('Choose an input image first (a file, or "As input" on a gallery image).');
      return false;
    }
    return true;
  }

  function generateI2i() {
    if (!needI2iImage()) return;
    runJob(Object.assign(commonRequest(), {
      mode: 'image_to_image', prompt: $('i2i-prompt').value, image: state.i2iImage,
      strength: floatValue('i2i-strength', 0.5),
    }));
  }

  function generateVariations() {
    if (!needI2iImage()) return;
    runJob(Object.assign(commonRequest(), { mode: 'variations', image: state.i2iImage }));
  }

  function generateControlNet() {
    if (!state.hintImage) {
      showError('Choose a hint image (for example a depth map) first.');
      return;
    }
    const req = Object.assign(commonRequest(), { mode: 'controlnet', prompt: $('i2i-prompt').value, hint: state.hintImage });
    if (state.i2iImage) {
      req.image = state.i2iImage;
      req.strength = floatValue('i2i-strength', 0.5);
    }
    runJob(req);
  }

  // Mixing
  function addMixRow(kind, value) {
    const weight = el('input', { type: 'range', class: 'mix-weight', min: '0', max: '1', step: '0.05', value: '0.5' });
    const weightValue = el('span', { class: 'value mix-weight-value', text: '0.50' });
    weight.addEventListener('input', () => { weightValue.textContent = Number(weight.value).toFixed(2); });
    const row = el('div', { class: 'mix-row', dataset: { kind } });
    if (kind === 'text') {
      row.append(el('input', { type: 'text', class: 'mix-text grow', placeholder: 'Text to mix', value: value || '' }));
    } else {
      const thumb = el('img', { class: 'mix-thumb', alt: '', hidden: '' });
      const file = el('input', { type: 'file', class: 'mix-file', accept: 'image/*' });
      file.addEventListener('change', async () => {
        row._image = null;
        thumb.hidden = true;
        try {
          const png = await fileToPng(file.files[0]);
          if (!png) return;
          row._image = png.url;
          thumb.src = png.url;
          thumb.hidden = false;
        } catch (e) {
          showError(e.message);
        }
      });
      row.append(file, thumb);
    }
    row.append(
      el('label', { class: 'inline weight-label' }, ['Weight ', weight, weightValue]),
      el('button', { type: 'button', class: 'mix-remove', title: 'Remove this input', text: 'Remove', onclick: () => row.remove() }),
    );
    $('mix-inputs').append(row);
    return row;
  }

  function generateMix() {
    const inputs = [];
    for (const row of document.querySelectorAll('#mix-inputs .mix-row')) {
      const weight = Number(row.querySelector('.mix-weight').value);
      if (row.dataset.kind === 'text') {
        const text = row.querySelector('.mix-text').value.trim();
        if (text) inputs.push({ text, weight });
      } else if (row._image) {
        inputs.push({ image: row._image, weight });
      }
    }
    if (inputs.length < 2) {
      showError('Mixing needs at least two inputs (texts or images).');
      return;
    }
    runJob(Object.assign(commonRequest(), { mode: 'mixing', inputs }));
  }

  // ---------------------------------------------------------------------
  // 5. Infinite canvas
  // ---------------------------------------------------------------------
  //
  // Coordinates:
  //   world  - unbounded integer pixel grid of the picture.
  //   screen - CSS pixels relative to the top-left of <canvas id="canvas">.
  //   screen = (world - view) * zoom,  world = screen / zoom + view
  //   where `view` is the world point shown at the top-left corner.
  //
  // The picture lives in the offscreen canvas `content`, whose pixel (0,0)
  // is world point `origin`. It only covers what has been painted so far and
  // grows (see ensureBounds) when a merge lands outside it. The repaint mask
  // is a second canvas with exactly the same size and origin (opaque red
  // where painted, transparent elsewhere).

  const editor = (function () {
    const canvas = $('canvas');
    const ctx = canvas.getContext('2d');

    let content = null;            // HTMLCanvasElement or null (= empty)
    let mask = null;               // same size as content
    let origin = { x: 0, y: 0 };   // world position of content's pixel (0,0)
    let win = { x: 0, y: 0, w: 0, h: 0 }; // size set from the model (setWindowSize)
    let view = { x: 0, y: 0, zoom: 1 };
    let viewFitted = false;        // fit the view once the canvas has a size
    let cssW = 0, cssH = 0;        // canvas size in CSS pixels
    let tool = 'window';
    let drag = null;               // current pointer gesture
    let hover = null;              // last pointer position (screen) for the brush cursor
    let pending = null;            // {x,y,w,h,preview} of a running canvas job
    const undoStack = [];
    const UNDO_LIMIT = 30;

    // A small checkerboard pattern for empty space.
    const checker = (() => {
      const c = makeCanvas(16, 16);
      const g = c.getContext('2d');
      g.fillStyle = '#e4e4e4'; g.fillRect(0, 0, 16, 16);
      g.fillStyle = '#f6f6f6'; g.fillRect(0, 0, 8, 8); g.fillRect(8, 8, 8, 8);
      return ctx.createPattern(c, 'repeat');
    })();

    const toWorld = (sx, sy) => ({ x: sx / view.zoom + view.x, y: sy / view.zoom + view.y });
    const toScreen = (wx, wy) => ({ x: (wx - view.x) * view.zoom, y: (wy - view.y) * view.zoom });

    function contentSize() { return content ? [content.width, content.height] : [0, 0]; }

    function updateSizeLabel() {
      const [w, h] = contentSize();
      $('canvas-size').textContent = `${w}×${h}`;
      $('canvas-undo').disabled = undoStack.length === 0;
    }

    // --- view --------------------------------------------------------

    /** Syncs the backing store with the CSS size (times devicePixelRatio). */
    function measure() {
      const rect = canvas.getBoundingClientRect();
      const w = Math.round(rect.width), h = Math.round(rect.height);
      if (w <= 0 || h <= 0) return false;
      if (w !== cssW || h !== cssH) {
        // Keep the world point in the centre fixed while resizing.
        if (cssW > 0 && cssH > 0) {
          const c = toWorld(cssW / 2, cssH / 2);
          view.x = c.x - w / 2 / view.zoom;
          view.y = c.y - h / 2 / view.zoom;
        }
        cssW = w; cssH = h;
        const dpr = window.devicePixelRatio || 1;
        canvas.width = Math.round(w * dpr);
        canvas.height = Math.round(h * dpr);
      }
      if (!viewFitted) fitView();
      return true;
    }

    /** Zoom so the generation window is ~40 % of the canvas height, centred. */
    function fitView() {
      if (cssW <= 0 || cssH <= 0 || win.w <= 0) return;
      view.zoom = Math.min((cssH * 0.4) / win.h, (cssW * 0.6) / win.w);
      view.x = win.x + win.w / 2 - cssW / 2 / view.zoom;
      view.y = win.y + win.h / 2 - cssH / 2 / view.zoom;
      viewFitted = true;
    }

    function zoomAt(sx, sy, factor) {
      const before = toWorld(sx, sy);
      view.zoom = Math.min(64, Math.max(0.02, view.zoom * factor));
      // Keep the world point under the cursor where it was.
      view.x = before.x - sx / view.zoom;
      view.y = before.y - sy / view.zoom;
      draw();
    }

    // --- drawing -----------------------------------------------------

    let drawQueued = false;
    function draw() {
      if (drawQueued) return;
      drawQueued = true;
      requestAnimationFrame(() => { drawQueued = false; render(); });
    }

    function render() {
      if (cssW <= 0 || !measure()) return;
      const dpr = window.devicePixelRatio || 1;
      ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
      ctx.fillStyle = checker;
      ctx.fillRect(0, 0, cssW, cssH);
      // Show individual pixels when zoomed in (the small model is only 64 px).
      ctx.imageSmoothingEnabled = view.zoom < 1;

      if (content) {
        const p = toScreen(origin.x, origin.y);
        const w = content.width * view.zoom, h = content.height * view.zoom;
        ctx.drawImage(content, p.x, p.y, w, h);
        ctx.globalAlpha = 0.45;
        ctx.drawImage(mask, p.x, p.y, w, h);
        ctx.globalAlpha = 1;
        ctx.strokeStyle = 'rgba(0,0,0,0.25)';
        ctx.lineWidth = 1;
        ctx.setLineDash([]);
        ctx.strokeRect(p.x - 0.5, p.y - 0.5, w + 1, h + 1);
      }

      // Preview of the running canvas job, drawn inside its window.
      if (pending && pending.preview) {
        const p = toScreen(pending.x, pending.y);
        ctx.globalAlpha = 0.9;
        ctx.drawImage(pending.preview, p.x, p.y, pending.w * view.zoom, pending.h * view.zoom);
        ctx.globalAlpha = 1;
      }

      // Generation window: dashed rectangle (white + dark for contrast).
      const p = toScreen(win.x, win.y);
      const w = win.w * view.zoom, h = win.h * view.zoom;
      ctx.lineWidth = 2;
      ctx.setLineDash([8, 6]);
      ctx.strokeStyle = '#ffffff';
      ctx.lineDashOffset = 0;
      ctx.strokeRect(p.x, p.y, w, h);
      ctx.strokeStyle = pending ? '#c2410c' : '#1d4ed8';
      ctx.lineDashOffset = 7;
      ctx.strokeRect(p.x, p.y, w, h);
      ctx.setLineDash([]);
      // Label above the window on a white box so it stays readable on content.
      const label = `${win.w}×${win.h} @ ${win.x},${win.y}${pending ? ' · generating…' : ''}`;
      ctx.font = '12px system-ui, sans-serif';
      const tw = ctx.measureText(label).width;
      ctx.fillStyle = 'rgba(255,255,255,0.85)';
      ctx.fillRect(p.x - 1, p.y - 19, tw + 8, 16);
      ctx.fillStyle = pending ? '#c2410c' : '#1d4ed8';
      ctx.fillText(label, p.x + 3, p.y - 7);

      // Brush outline under the cursor.
      if (hover && (tool === 'brush' || tool === 'eraser')) {
        const r = (brushSize() / 2) * view.zoom;
        ctx.beginPath();
        ctx.arc(hover.x, hover.y, Math.max(1, r), 0, Math.PI * 2);
        ctx.strokeStyle = tool === 'brush' ? 'rgba(220,38,38,0.9)' : 'rgba(0,0,0,0.7)';
        ctx.lineWidth = 1;
        ctx.stroke();
      }
    }

    // --- content storage ---------------------------------------------

    function cloneCanvas(c) {
      if (!c) return null;
      const copy = makeCanvas(c.width, c.height);
      copy.getContext('2d').drawImage(c, 0, 0);
      return copy;
    }

    /**
     * Grows content + mask so they cover the world rectangle (x, y, w, h).
     * A canvas cannot be resized without losing its pixels, so a bigger one
     * is allocated and the old pixels are copied at the offset by which the
     * origin moved (old origin - new origin).
     */
    function ensureBounds(x, y, w, h) {
      if (!content) {
        content = makeCanvas(w, h);
        mask = makeCanvas(w, h);
        origin = { x, y };
        return;
      }
      const x0 = Math.min(origin.x, x), y0 = Math.min(origin.y, y);
      const x1 = Math.max(origin.x + content.width, x + w);
      const y1 = Math.max(origin.y + content.height, y + h);
      if (x0 === origin.x && y0 === origin.y && x1 - x0 === content.width && y1 - y0 === content.height) return;
      const grow = (old) => {
        const c = makeCanvas(x1 - x0, y1 - y0);
        c.getContext('2d').drawImage(old, origin.x - x0, origin.y - y0);
        return c;
      };
      content = grow(content);
      mask = grow(mask);
      origin = { x: x0, y: y0 };
    }

    // Undo keeps full copies of content + mask (they are small compared to
    // the cost of recomputing a generation).
    function pushUndo() {
      undoStack.push({ content: cloneCanvas(content), mask: cloneCanvas(mask), origin: { ...origin } });
      if (undoStack.length > UNDO_LIMIT) undoStack.shift();
      updateSizeLabel();
    }

    function undo() {
      const s = undoStack.pop();
      if (!s) return;
      content = s.content;
      mask = s.mask;
      origin = s.origin;
      updateSizeLabel();
      draw();
    }

    /** Draws an image into the content at world (x, y), size w×h. */
    function drawIntoContent(img, x, y, w, h) {
      ensureBounds(x, y, w, h);
      const g = content.getContext('2d');
      g.clearRect(x - origin.x, y - origin.y, w, h);
      g.imageSmoothingEnabled = true;
      g.drawImage(img, x - origin.x, y - origin.y, w, h);
    }

    /**
     * Puts an image on the canvas at the window position. Gallery images keep
     * their size; loaded files larger than the window are scaled down to fit.
     */
    function placeImage(img, fitToWindow) {
      let w = img.naturalWidth || img.width, h = img.naturalHeight || img.height;
      if (fitToWindow && (w > win.w || h > win.h)) {
        const s = Math.min(win.w / w, win.h / h);
        w = Math.max(1, Math.round(w * s));
        h = Math.max(1, Math.round(h * s));
      }
      pushUndo();
      drawIntoContent(img, win.x, win.y, w, h);
      updateSizeLabel();
      draw();
    }

    function clearAll() {
      if (!content) return;
      pushUndo();
      content = null;
      mask = null;
      updateSizeLabel();
      draw();
    }

    // --- mask painting -----------------------------------------------

    function brushSize() { return Math.max(1, Number($('brush-size').value) || 8); }

    /** Strokes the mask from world point a to b (clipped to the content). */
    function paintStroke(a, b, erase) {
      if (!mask) return;
      const g = mask.getContext('2d');
      g.save();
      g.globalCompositeOperation = erase ? 'destination-out' : 'source-over';
      g.strokeStyle = '#ff0000';
      g.fillStyle = '#ff0000';
      g.lineWidth = brushSize();
      g.lineCap = 'round';
      g.lineJoin = 'round';
      g.beginPath();
      g.moveTo(a.x - origin.x, a.y - origin.y);
      g.lineTo(b.x - origin.x, b.y - origin.y);
      g.stroke();
      // A single click (a == b) still leaves a round dot.
      g.beginPath();
      g.arc(b.x - origin.x, b.y - origin.y, brushSize() / 2, 0, Math.PI * 2);
      g.fill();
      g.restore();
      draw();
    }

    // --- pointer handling --------------------------------------------

    function localPos(ev) {
      const r = canvas.getBoundingClientRect();
      return { x: ev.clientX - r.left, y: ev.clientY - r.top };
    }

    canvas.addEventListener('contextmenu', (ev) => ev.preventDefault());
    canvas.addEventListener('mousedown', (ev) => { if (ev.button === 1) ev.preventDefault(); }); // no autoscroll

    canvas.addEventListener('pointerdown', (ev) => {
      if (ev.button !== 0 && ev.button !== 1) return;
      measure();
      canvas.focus({ preventScroll: true });
      const s = localPos(ev);
      const mode = ev.button === 1 ? 'pan' : tool;
      drag = { mode, pointer: ev.pointerId, start: s, view: { ...view }, win: { ...win }, last: toWorld(s.x, s.y) };
      try { canvas.setPointerCapture(ev.pointerId); } catch (_) { /* synthetic events */ }
      if (mode === 'brush' || mode === 'eraser') paintStroke(drag.last, drag.last, mode === 'eraser');
      ev.preventDefault();
    });

    canvas.addEventListener('pointermove', (ev) => {
      const s = localPos(ev);
      hover = s;
      if (!drag || ev.pointerId !== drag.pointer) {
        if (tool === 'brush' || tool === 'eraser') draw();
        return;
      }
      const dx = s.x - drag.start.x, dy = s.y - drag.start.y;
      if (drag.mode === 'pan') {
        view.x = drag.view.x - dx / view.zoom;
        view.y = drag.view.y - dy / view.zoom;
        draw();
      } else if (drag.mode === 'window') {
        // Snap to whole world pixels so the cut-out aligns with the content.
        setWindowPos(drag.win.x + dx / view.zoom, drag.win.y + dy / view.zoom);
      } else {
        const w = toWorld(s.x, s.y);
        paintStroke(drag.last, w, drag.mode === 'eraser');
        drag.last = w;
      }
    });

    function endDrag(ev) {
      if (drag && ev.pointerId === drag.pointer) drag = null;
    }
    canvas.addEventListener('pointerup', endDrag);
    canvas.addEventListener('pointercancel', endDrag);
    canvas.addEventListener('pointerleave', () => { hover = null; draw(); });

    canvas.addEventListener('wheel', (ev) => {
      ev.preventDefault();
      const s = localPos(ev);
      // deltaMode 1 = lines; normalise roughly to pixels.
      const delta = ev.deltaMode === 1 ? ev.deltaY * 16 : ev.deltaY;
      zoomAt(s.x, s.y, Math.exp(-delta * 0.0015));
    }, { passive: false });

    function setTool(name) {
      tool = name;
      document.querySelectorAll('.tool').forEach((b) => {
        const on = b.dataset.tool === name;
        b.classList.toggle('active', on);
        b.setAttribute('aria-pressed', on ? 'true' : 'false');
      });
      canvas.dataset.tool = name;
      draw();
    }

    function setWindowPos(x, y) {
      win.x = Math.round(Number(x) || 0);
      win.y = Math.round(Number(y) || 0);
      draw();
    }

    function setWindowSize(n) {
      if (win.w === n && win.h === n) return;
      if (win.w === 0) { // first model: window at the world origin
        win.w = n; win.h = n;
        viewFitted = false;
        if (measure()) draw();
        return;
      }
      // Keep the window centred where it was.
      const cx = win.x + win.w / 2, cy = win.y + win.h / 2;
      win.w = n; win.h = n;
      win.x = Math.round(cx - n / 2);
      win.y = Math.round(cy - n / 2);
      viewFitted = false;
      if (measure()) draw();
    }

    // --- generation ----------------------------------------------------

    /**
     * Cuts the window out of content + mask. Returns null when the window is
     * entirely empty, else {image, mask, repaint} where image has the empty
     * pixels filled with the mean colour of the known ones, and mask is white
     * where the content is empty or painted, black elsewhere.
     */
    function cutWindow(x, y, w, h) {
      if (!content) return null;
      const img = makeCanvas(w, h), msk = makeCanvas(w, h);
      img.getContext('2d').drawImage(content, origin.x - x, origin.y - y);
      msk.getContext('2d').drawImage(mask, origin.x - x, origin.y - y);
      const id = img.getContext('2d').getImageData(0, 0, w, h);
      const md = msk.getContext('2d').getImageData(0, 0, w, h);
      const px = id.data, mp = md.data;
      let n = 0, r = 0, g = 0, b = 0;
      for (let i = 0; i < px.length; i += 4) {
        if (px[i + 3] > 0) { n++; r += px[i]; g += px[i + 1]; b += px[i + 2]; }
      }
      if (n === 0) return null;
      r = Math.round(r / n); g = Math.round(g / n); b = Math.round(b / n);
      let repaint = 0;
      for (let i = 0; i < px.length; i += 4) {
        const empty = px[i + 3] === 0;
        const painted = mp[i + 3] > 0;
        if (empty) { px[i] = r; px[i + 1] = g; px[i + 2] = b; }
        px[i + 3] = 255;
        const v = empty || painted ? 255 : 0;
        if (v) repaint++;
        mp[i] = mp[i + 1] = mp[i + 2] = v;
        mp[i + 3] = 255;
      }
      img.getContext('2d').putImageData(id, 0, 0);
      msk.getContext('2d').putImageData(md, 0, 0);
      return { image: img.toDataURL('image/png'), mask: msk.toDataURL('image/png'), repaint };
    }

    function generate() {
      if (state.job) return;
      clearError();
      const x = win.x, y = win.y, w = win.w, h = win.h;
      const cut = cutWindow(x, y, w, h);
      const req = commonRequest();
      Object.assign(req, { prompt: $('canvas-prompt').value, width: w, height: h, num_images: 1 });
      if (!cut) {
        req.mode = 'text_to_image';
      } else {
        if (!supports('inpainting')) {
          showError(`The model "${state.model ? state.model.name : ''}" cannot inpaint; move the window to empty space.`);
          return;
        }
        if (cut.repaint === 0) {
          showError('Nothing to repaint in the window: paint a mask with the brush or move the window over empty space.');
          return;
        }
        Object.assign(req, { mode: 'inpainting', image: cut.image, mask: cut.mask, mask_blur: floatValue('mask-blur', 2) });
      }
      // The window position is captured now, so moving it while the job
      // runs does not change where the result lands.
      pending = { x, y, w, h, preview: null };
      draw();
      runJob(req, {
        onPreview: (url) => {
          loadImage(url).then((img) => { if (pending) { pending.preview = img; draw(); } }).catch(() => {});
        },
        onDone: (result) => {
          const b64 = result.images && result.images[0];
          if (!b64) return;
          loadImage(pngUrl(b64)).then((img) => {
            pushUndo();
            drawIntoContent(img, x, y, w, h);
            // The painted mask inside the window has been used up.
            mask.getContext('2d').clearRect(x - origin.x, y - origin.y, w, h);
            updateSizeLabel();
            draw();
          }).catch((e) => showError(e.message));
        },
        onEnd: () => { pending = null; draw(); },
      }).then((started) => { if (!started) { pending = null; draw(); } });
    }

    /** Downloads the content, cropped to the bounds of its non-transparent pixels. */
    function exportPng() {
      if (!content) { showError('The canvas is empty.'); return; }
      const d = content.getContext('2d').getImageData(0, 0, content.width, content.height).data;
      let x0 = content.width, y0 = content.height, x1 = -1, y1 = -1;
      for (let yy = 0; yy < content.height; yy++) {
        for (let xx = 0; xx < content.width; xx++) {
          if (d[(yy * content.width + xx) * 4 + 3] > 0) {
            if (xx < x0) x0 = xx;
            if (xx > x1) x1 = xx;
            if (yy < y0) y0 = yy;
            if (yy > y1) y1 = yy;
          }
        }
      }
      if (x1 < 0) { showError('The canvas is empty.'); return; }
      const out = makeCanvas(x1 - x0 + 1, y1 - y0 + 1);
      out.getContext('2d').drawImage(content, -x0, -y0);
      const a = el('a', { href: out.toDataURL('image/png'), download: 'kandinsky-canvas.png' });
      document.body.append(a);
      a.click();
      a.remove();
    }

    // Canvas becomes visible (tab switch) or changes size.
    function onShow() { if (measure()) draw(); }
    if (window.ResizeObserver) new ResizeObserver(() => onShow()).observe(canvas);
    window.addEventListener('resize', onShow);

    updateSizeLabel();

    return {
      // Public contract (tests / debugging)
      contentSize,
      windowPos: () => [win.x, win.y],
      windowSize: () => [win.w, win.h],
      setWindowPos,
      zoom: () => view.zoom,
      // Extras for debugging: view state and coordinate conversion in
      // page (client) coordinates.
      view: () => ({ x: view.x, y: view.y, zoom: view.zoom }),
      worldToClient: (x, y) => {
        measure();
        const r = canvas.getBoundingClientRect();
        const s = toScreen(x, y);
        return [r.left + s.x, r.top + s.y];
      },
      clientToWorld: (cx, cy) => {
        measure();
        const r = canvas.getBoundingClientRect();
        const w = toWorld(cx - r.left, cy - r.top);
        return [w.x, w.y];
      },
      contentOrigin: () => [origin.x, origin.y],
      undoDepth: () => undoStack.length,
      // Used by the rest of the page
      setTool, setWindowSize, placeImage, undo, clearAll, generate, exportPng, onShow, fitView: () => { fitView(); draw(); },
    };
  })();
  window.editor = editor;

  // ---------------------------------------------------------------------
  // 6. Wiring and start-up
  // ---------------------------------------------------------------------

  function ctrlEnter(id, fn) {
    $(id).addEventListener('keydown', (ev) => {
      if (ev.key === 'Enter' && (ev.ctrlKey || ev.metaKey)) { ev.preventDefault(); if (!state.job) fn(); }
    });
  }

  function wire() {
    document.querySelectorAll('.tab').forEach((t) => t.addEventListener('click', () => showTab(t.dataset.panel)));

    $('model').addEventListener('change', onModelChange);
    $('aspect').addEventListener('change', applyAspect);
    for (const id of ['width', 'height']) $(id).addEventListener('input', () => { $('aspect').value = 'custom'; });
    $('seed-random').addEventListener('click', () => { $('seed').value = -1; });
    $('seed-reuse').addEventListener('click', () => { if (state.lastSeed != null) $('seed').value = state.lastSeed; });
    $('cancel').addEventListener('click', cancelJob);
    $('error').addEventListener('click', clearError);

    $('generate').addEventListener('click', generateTxt2Img);
    ctrlEnter('prompt', generateTxt2Img);

    $('i2i-file').addEventListener('change', async (ev) => {
      try {
        const png = await fileToPng(ev.target.files[0]);
        if (png) setI2iImage(png.url);
      } catch (e) { showError(e.message); }
    });
    $('cn-hint').addEventListener('change', async (ev) => {
      try {
        const png = await fileToPng(ev.target.files[0]);
        if (!png) return;
        state.hintImage = png.url;
        $('cn-hint-thumb').src = png.url;
        $('cn-hint-thumb').hidden = false;
      } catch (e) { showError(e.message); }
    });
    const strength = $('i2i-strength');
    strength.addEventListener('input', () => { $('i2i-strength-value').textContent = Number(strength.value).toFixed(2); });
    $('i2i-generate').addEventListener('click', generateI2i);
    $('var-generate').addEventListener('click', generateVariations);
    $('cn-generate').addEventListener('click', generateControlNet);
    ctrlEnter('i2i-prompt', generateI2i);

    $('mix-add-text').addEventListener('click', () => addMixRow('text'));
    $('mix-add-image').addEventListener('click', () => addMixRow('image'));
    $('mix-generate').addEventListener('click', generateMix);
    addMixRow('text');
    addMixRow('text');

    document.querySelectorAll('.tool').forEach((b) => b.addEventListener('click', () => editor.setTool(b.dataset.tool)));
    const brush = $('brush-size');
    brush.addEventListener('input', () => { $('brush-size-value').textContent = brush.value; });
    $('canvas-generate').addEventListener('click', editor.generate);
    $('canvas-prompt').addEventListener('keydown', (ev) => {
      if (ev.key === 'Enter' && !state.job) { ev.preventDefault(); editor.generate(); }
    });
    $('canvas-undo').addEventListener('click', editor.undo);
    $('canvas-fit').addEventListener('click', editor.fitView);
    $('canvas-export').addEventListener('click', editor.exportPng);
    $('canvas-clear').addEventListener('click', editor.clearAll);
    $('canvas-load').addEventListener('change', async (ev) => {
      const input = ev.target;
      try {
        const file = input.files[0];
        if (!file) return;
        const img = await loadImage(await readFileAsDataURL(file));
        editor.placeImage(img, true);
      } catch (e) {
        showError(e.message);
      } finally {
        input.value = ''; // allow loading the same file again
      }
    });

    // Ctrl+Z on the canvas tab (outside text fields) undoes the last change.
    document.addEventListener('keydown', (ev) => {
      if (ev.key.toLowerCase() !== 'z' || !(ev.ctrlKey || ev.metaKey) || ev.shiftKey) return;
      if ($('panel-canvas').hidden) return;
      const t = ev.target;
      if (t && (t.tagName === 'INPUT' || t.tagName === 'TEXTAREA' || t.tagName === 'SELECT')) return;
      ev.preventDefault();
      editor.undo();
    });
  }

  async function start() {
    wire();
    refreshButtons();
    const [models, samplers] = await Promise.allSettled([getJSON('/api/v1/models'), getJSON('/api/v1/samplers')]);
    if (samplers.status === 'fulfilled' && Array.isArray(samplers.value)) fillSamplers(samplers.value);
    if (models.status === 'fulfilled' && Array.isArray(models.value)) {
      fillModels(models.value);
    } else {
      showError(`Could not load the model list: ${models.reason ? models.reason.message : 'unexpected answer'}`);
    }
    if (samplers.status === 'rejected') showError(`Could not load the sampler list: ${samplers.reason.message}`);
    document.body.dataset.ready = 'true';
  }

  start();
})();
