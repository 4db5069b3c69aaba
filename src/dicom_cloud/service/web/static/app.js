// dicom-cloud's web pages: plain JavaScript over the service's JSON API, no build step.
// Requests carry the session cookie (same origin); writes also send X-CSRF-Token, the value
// of the dc_csrf cookie. Text from the archive is only ever set as textContent, never as HTML.
'use strict';

(function () {
  const TAG = {
    study: '0020000D', series: '0020000E', patientName: '00100010', patientId: '00100020',
    studyDate: '00080020', studyDescription: '00081030', modalities: '00080061', accession: '00080050',
    studySeries: '00201206', studyInstances: '00201208', modality: '00080060', seriesNumber: '00200011',
    seriesDescription: '0008103E', seriesInstances: '00201209', birthDate: '00100030',
  };
  const JSON_TYPE = 'application/dicom+json, application/json';

  function cookie(name) {
    for (const part of document.cookie.split(';')) {
      const [key, ...rest] = part.trim().split('=');
      if (key === name) return decodeURIComponent(rest.join('='));
    }
    return '';
  }

  function signIn() {
    window.location.href = '/login?next=' + encodeURIComponent(location.pathname + location.search);
  }

  async function api(method, path, json) {
    const headers = { Accept: JSON_TYPE };
    if (method !== 'GET') headers['X-CSRF-Token'] = cookie('dc_csrf');
    let body;
    if (json !== undefined) {
      headers['Content-Type'] = 'application/json';
      body = JSON.stringify(json);
    }
    const answer = await fetch(path, { method, headers, body, credentials: 'same-origin' });
    if (answer.status === 401) {
      signIn();
      throw new Error('signed out');
    }
    const text = await answer.text();
    let data = null;
    if (text) {
      try { data = JSON.parse(text); } catch (e) { data = text; }
    }
    if (!answer.ok) {
      const error = new Error((data && data.message) || 'HTTP ' + answer.status);
      error.status = answer.status;
      throw error;
    }
    return data;
  }

  function first(entry, tag) {
    const element = entry[tag];
    if (!element || !element.Value || !element.Value.length) return '';
    const value = element.Value[0];
    if (value && typeof value === 'object') return value.Alphabetic || '';
    return String(value);
  }

  function all(entry, tag) {
    const element = entry[tag];
    return element && element.Value ? element.Value.map(String) : [];
  }

  function el(name, attributes, ...children) {
    const node = document.createElement(name);
    for (const [key, value] of Object.entries(attributes || {})) {
      if (key === 'text') node.textContent = value;
      else if (key === 'class') node.className = value;
      else if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value);
    }
    for (const child of children) node.append(child);
    return node;
  }

  function dicomDate(text) {
    return text && text.length === 8 ? text.slice(0, 4) + '-' + text.slice(4, 6) + '-' + text.slice(6) : text;
  }

  function personName(text) {
    return text.replace(/\^+/g, ' ').trim();
  }

  function bytes(n) {
    if (n < 1024) return n + ' B';
    if (n < 1024 * 1024) return (n / 1024).toFixed(1) + ' KiB';
    if (n < 1024 * 1024 * 1024) return (n / 1024 / 1024).toFixed(1) + ' MiB';
    return (n / 1024 / 1024 / 1024).toFixed(2) + ' GiB';
  }

  function viewerUrl(study) {
    return '/viewer/viewer?StudyInstanceUIDs=' + encodeURIComponent(study);
  }

  // ---- the studies page -------------------------------------------------------------------

  async function loadStudies() {
    const form = document.getElementById('search');
    const status = document.getElementById('studies-status');
    const rows = document.getElementById('study-rows');
    const data = new FormData(form);
    const params = new URLSearchParams({ limit: '200' });
    const patient = String(data.get('patient') || '').trim();
    const from = String(data.get('from') || '').replace(/-/g, '');
    const to = String(data.get('to') || '').replace(/-/g, '');
    const modality = String(data.get('modality') || '').trim().toUpperCase();
    const label = String(data.get('label') || '').trim();
    if (from || to) params.set('StudyDate', from + '-' + to);
    if (modality) params.set('ModalitiesInStudy', modality);
    if (label) params.set('label', label);
    status.textContent = 'Searching...';
    try {
      let studies;
      if (patient) {
        // A name or an ID: two searches, merged (QIDO has no OR across attributes).
        const term = '*' + patient + '*';
        const byName = new URLSearchParams(params); byName.set('PatientName', term);
        const byId = new URLSearchParams(params); byId.set('PatientID', term);
        const [a, b] = await Promise.all([api('GET', '/studies?' + byName), api('GET', '/studies?' + byId)]);
        const seen = new Map();
        for (const study of (a || []).concat(b || [])) seen.set(first(study, TAG.study), study);
        studies = Array.from(seen.values());
      } else {
        studies = (await api('GET', '/studies?' + params)) || [];
      }
      rows.replaceChildren(...studies.map(studyRow));
      status.textContent = studies.length ? studies.length + ' studies' : 'No study matches.';
    } catch (error) {
      status.textContent = 'Search failed: ' + error.message;
    }
  }

  function studyRow(study) {
    const uid = first(study, TAG.study);
    const page = '/web/study/' + encodeURIComponent(uid);
    const actions = el('td', { class: 'actions' });
    if (document.body.dataset.viewer === '1') {
      actions.append(el('a', { href: viewerUrl(uid), class: 'button', text: 'Open in viewer' }));
    }
    return el('tr', { 'data-study': uid },
      el('td', {}, el('a', { href: page, text: personName(first(study, TAG.patientName)) || '(no name)' })),
      el('td', { text: first(study, TAG.patientId) }),
      el('td', { text: dicomDate(first(study, TAG.studyDate)) }),
      el('td', {}, el('a', { href: page, text: first(study, TAG.studyDescription) || '(no description)' })),
      el('td', { text: all(study, TAG.modalities).join(', ') }),
      el('td', { text: first(study, TAG.studySeries) }),
      el('td', { text: first(study, TAG.studyInstances) }),
      actions);
  }

  // ---- uploads ------------------------------------------------------------------------------

  // Files of a drop: folders are walked (webkitGetAsEntry), keeping their relative paths.
  async function droppedFiles(transfer) {
    const entries = [];
    for (const item of transfer.items || []) {
      const entry = item.webkitGetAsEntry ? item.webkitGetAsEntry() : null;
      if (entry) entries.push(entry);
    }
    if (!entries.length) return Array.from(transfer.files || []).map((file) => ({ file, path: file.name }));
    const found = [];
    async function walk(entry) {
      if (entry.isFile) {
        const file = await new Promise((resolve, reject) => entry.file(resolve, reject));
        found.push({ file, path: entry.fullPath.replace(/^\//, '') });
      } else if (entry.isDirectory) {
        const reader = entry.createReader();
        for (;;) {
          const batch = await new Promise((resolve, reject) => reader.readEntries(resolve, reject));
          if (!batch.length) break;
          for (const child of batch) await walk(child);
        }
      }
    }
    for (const entry of entries) await walk(entry);
    return found;
  }

  function put(url, headers, blob, onProgress) {
    return new Promise((resolve, reject) => {
      const request = new XMLHttpRequest();
      request.open('PUT', url);
      for (const [name, value] of Object.entries(headers || {})) {
        // Browsers set Content-Length from the body themselves (and refuse to be told).
        if (name.toLowerCase() !== 'content-length') request.setRequestHeader(name, value);
      }
      request.upload.onprogress = (event) => onProgress(event.loaded);
      request.onload = () => {
        // 308: a GCS resumable session took a chunk that is not the last one.
        if ((request.status >= 200 && request.status < 300) || request.status === 308) resolve(request);
        else reject(new Error('HTTP ' + request.status));
      };
      request.onerror = () => reject(new Error('network error'));
      request.send(blob);
    });
  }

  async function pool(items, limit, work) {
    let next = 0;
    async function worker() {
      while (next < items.length) {
        const item = items[next++];
        await work(item);
      }
    }
    await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
  }

  async function upload(entries) {
    const body = document.body.dataset;
    const maxBytes = Number(body.uploadMaxBytes);
    const batchSize = Math.min(Number(body.uploadMaxFiles) || 100, 100);
    const progress = document.getElementById('upload-progress');
    const list = document.getElementById('upload-files');
    const summary = document.getElementById('upload-summary');
    const total = document.getElementById('upload-total');
    const refusedBox = document.getElementById('upload-refused');
    const refusedRows = document.getElementById('refused-rows');
    progress.classList.remove('hidden');
    list.replaceChildren();
    refusedRows.replaceChildren();
    refusedBox.classList.add('hidden');
    const refuse = (item, reason) => {
      item.state.textContent = 'refused';
      item.row.classList.add('refused');
      refusedRows.append(el('tr', {}, el('td', { text: item.path }), el('td', { text: reason })));
      refusedBox.classList.remove('hidden');
    };
    const items = entries.map(({ file, path }) => {
      const bar = el('progress', { max: String(Math.max(file.size, 1)), value: '0' });
      const state = el('span', { class: 'state', text: 'waiting' });
      const row = el('li', { 'data-name': path }, el('span', { class: 'name', text: path }), bar, state);
      list.append(row);
      return { file, path, bar, state, row, sent: 0 };
    });
    const totalBytes = items.reduce((sum, item) => sum + item.file.size, 0) || 1;
    total.max = totalBytes;
    const update = () => {
      const sent = items.reduce((sum, item) => sum + item.sent, 0);
      total.value = sent;
      summary.textContent = 'Sent ' + bytes(sent) + ' of ' + bytes(totalBytes) + ' (' + items.length + ' files)';
    };
    let accepted = 0;
    let refused = 0;
    const sendable = [];
    for (const item of items) {
      if (item.file.size === 0) { refuse(item, 'empty file'); refused++; }
      else if (item.file.size > maxBytes) { refuse(item, 'larger than the service accepts (' + bytes(maxBytes) + ')'); refused++; }
      else sendable.push(item);
    }
    for (let start = 0; start < sendable.length; start += batchSize) {
      const batch = sendable.slice(start, start + batchSize);
      let session;
      try {
        session = await api('POST', '/uploads', {
          files: batch.map((item) => ({ name: item.path.slice(-500), size: item.file.size, content_type: 'application/dicom' })),
        });
      } catch (error) {
        for (const item of batch) { refuse(item, 'upload refused: ' + error.message); refused++; }
        continue;
      }
      const parts = [];
      await pool(batch.map((item, index) => [item, session.files[index]]), 3, async ([item, target]) => {
        item.state.textContent = 'sending';
        try {
          if (target.multipart) {
            const etags = [];
            const done = new Array(target.multipart.parts.length).fill(0);
            for (const part of target.multipart.parts) {
              const offset = (part.number - 1) * target.multipart.part_size;
              const answer = await put(part.url, part.headers, item.file.slice(offset, offset + part.size), (n) => {
                done[part.number - 1] = n;
                item.sent = done.reduce((a, b) => a + b, 0);
                item.bar.value = item.sent;
                update();
              });
              etags.push(answer.getResponseHeader('ETag'));
            }
            parts.push({ index: target.index, upload_id: target.multipart.upload_id, etags });
          } else {
            await put(target.url, target.headers, item.file, (n) => { item.sent = n; item.bar.value = n; update(); });
          }
          item.sent = item.file.size;
          item.bar.value = item.file.size;
          item.state.textContent = 'sent';
        } catch (error) {
          item.state.textContent = 'failed';
          item.failure = 'not sent: ' + error.message;
        }
        update();
      });
      batch.forEach((item) => { if (!item.failure) item.state.textContent = 'checking'; });
      let result;
      try {
        result = await api('POST', '/uploads/' + encodeURIComponent(session.id) + '/complete', { parts });
      } catch (error) {
        for (const item of batch) { refuse(item, 'not stored: ' + error.message); refused++; }
        continue;
      }
      for (const outcome of result.accepted) {
        const item = batch[outcome.index];
        item.state.textContent = outcome.created ? 'stored' : 'already stored';
        item.row.classList.add('stored');
        accepted++;
      }
      for (const outcome of result.rejected) {
        const item = batch[outcome.index];
        refuse(item, item.failure || outcome.reason || 'refused');
        refused++;
      }
    }
    update();
    summary.textContent = accepted + ' stored, ' + refused + ' refused, of ' + items.length + ' files';
    summary.dataset.done = '1';
    loadStudies();
  }

  function setUpUpload() {
    const zone = document.getElementById('drop-zone');
    zone.addEventListener('dragover', (event) => { event.preventDefault(); zone.classList.add('over'); });
    zone.addEventListener('dragleave', () => zone.classList.remove('over'));
    zone.addEventListener('drop', async (event) => {
      event.preventDefault();
      zone.classList.remove('over');
      upload(await droppedFiles(event.dataTransfer));
    });
    for (const id of ['file-input', 'folder-input']) {
      const input = document.getElementById(id);
      input.addEventListener('change', () => {
        const files = Array.from(input.files).map((file) => ({ file, path: file.webkitRelativePath || file.name }));
        input.value = '';
        if (files.length) upload(files);
      });
    }
  }

  // ---- the study page ----------------------------------------------------------------------

  async function loadStudy() {
    const uid = document.body.dataset.study;
    const status = document.getElementById('study-status');
    if (document.body.dataset.viewer !== '1') document.getElementById('open-viewer').classList.add('hidden');
    try {
      const studies = await api('GET', '/studies?StudyInstanceUID=' + encodeURIComponent(uid));
      if (!studies || !studies.length) {
        document.getElementById('study-title').textContent = 'Study not found';
        return;
      }
      const study = studies[0];
      document.getElementById('study-title').textContent =
        (personName(first(study, TAG.patientName)) || '(no name)') + ' · ' + (first(study, TAG.studyDescription) || 'study');
      const attributes = document.getElementById('study-attributes');
      const shown = [
        ['Patient ID', first(study, TAG.patientId)], ['Birth date', dicomDate(first(study, TAG.birthDate))],
        ['Study date', dicomDate(first(study, TAG.studyDate))], ['Accession', first(study, TAG.accession)],
        ['Modalities', all(study, TAG.modalities).join(', ')], ['Instances', first(study, TAG.studyInstances)],
        ['Study UID', uid],
      ];
      attributes.replaceChildren(...shown.filter(([, v]) => v).flatMap(([k, v]) => [el('dt', { text: k }), el('dd', { text: v })]));
      const series = (await api('GET', '/studies/' + encodeURIComponent(uid) + '/series')) || [];
      series.sort((a, b) => Number(first(a, TAG.seriesNumber)) - Number(first(b, TAG.seriesNumber)));
      document.getElementById('series').replaceChildren(...series.map((item) => {
        const seriesUid = first(item, TAG.series);
        const thumbnail = '/studies/' + encodeURIComponent(uid) + '/series/' + encodeURIComponent(seriesUid) + '/thumbnail';
        const caption = [first(item, TAG.modality), '#' + first(item, TAG.seriesNumber), first(item, TAG.seriesDescription),
          first(item, TAG.seriesInstances) + ' instances'].filter((v) => v && v !== '#').join(' · ');
        const image = el('img', { src: thumbnail, alt: 'series ' + first(item, TAG.seriesNumber), loading: 'lazy' });
        image.addEventListener('error', () => image.replaceWith(el('div', { class: 'no-thumbnail', text: 'no preview' })));
        return el('figure', { 'data-series': seriesUid }, image, el('figcaption', { text: caption }));
      }));
      const labels = await api('GET', '/studies/' + encodeURIComponent(uid) + '/labels');
      const form = document.getElementById('labels');
      form.elements.tags.value = labels.tags.join(', ');
      form.elements.description.value = labels.description || '';
    } catch (error) {
      status.textContent = error.status === 404 ? 'This study does not exist (any more).' : 'Could not load the study: ' + error.message;
      return;
    }
    loadShares();
  }

  async function loadShares() {
    const uid = document.body.dataset.study;
    const rows = document.getElementById('share-rows');
    let shares;
    try {
      shares = await api('GET', '/studies/' + encodeURIComponent(uid) + '/shares');
    } catch (error) {
      rows.replaceChildren(el('tr', {}, el('td', { colspan: '5', text: 'Share links: ' + error.message })));
      return;
    }
    const now = Date.now();
    rows.replaceChildren(...shares.map((share) => {
      const expired = Date.parse(share.expires) <= now;
      const state = share.revoked ? 'revoked' : expired ? 'expired' : 'active';
      const revoke = state === 'active'
        ? el('button', { type: 'button', class: 'danger', text: 'Revoke', onclick: () => revokeShare(share.id) })
        : '';
      return el('tr', { 'data-share': String(share.id) },
        el('td', { text: '#' + share.id }),
        el('td', { text: new Date(share.created).toLocaleString() }),
        el('td', { text: new Date(share.expires).toLocaleString() }),
        el('td', { text: state }),
        el('td', {}, revoke));
    }));
  }

  async function revokeShare(id) {
    if (!window.confirm('Revoke share link #' + id + '? Whoever has it loses access at once.')) return;
    try {
      await api('DELETE', '/shares/' + id);
    } catch (error) {
      document.getElementById('study-status').textContent = 'Could not revoke: ' + error.message;
    }
    loadShares();
  }

  function setUpStudy() {
    const uid = document.body.dataset.study;
    const status = document.getElementById('study-status');
    document.getElementById('delete-study').addEventListener('click', async () => {
      const title = document.getElementById('study-title').textContent;
      if (!window.confirm('Delete the study "' + title + '" and all its images for good? This cannot be undone.')) return;
      try {
        await api('DELETE', '/studies/' + encodeURIComponent(uid));
        window.location.href = '/';
      } catch (error) {
        status.textContent = 'Could not delete: ' + error.message;
      }
    });
    document.getElementById('share-form').addEventListener('submit', async (event) => {
      event.preventDefault();
      const ttl = Number(new FormData(event.target).get('ttl'));
      const max = Number(document.body.dataset.shareMaxTtl) || ttl;
      try {
        const share = await api('POST', '/studies/' + encodeURIComponent(uid) + '/shares', { expires_in_seconds: Math.min(ttl, max) });
        document.getElementById('share-url').value = share.url;
        document.getElementById('new-share').classList.remove('hidden');
        document.getElementById('copy-status').textContent = '';
      } catch (error) {
        status.textContent = 'Could not create a share link: ' + error.message;
      }
      loadShares();
    });
    document.getElementById('copy-share').addEventListener('click', async () => {
      const field = document.getElementById('share-url');
      const said = document.getElementById('copy-status');
      try {
        await navigator.clipboard.writeText(field.value);
        said.textContent = 'Copied.';
      } catch (error) {
        field.select();
        said.textContent = document.execCommand('copy') ? 'Copied.' : 'Select the link and copy it.';
      }
    });
    document.getElementById('labels').addEventListener('submit', async (event) => {
      event.preventDefault();
      const form = event.target;
      const tags = form.elements.tags.value.split(',').map((t) => t.trim()).filter(Boolean);
      try {
        await api('PUT', '/studies/' + encodeURIComponent(uid) + '/labels', { tags, description: form.elements.description.value });
        status.textContent = 'Labels saved.';
      } catch (error) {
        status.textContent = 'Could not save the labels: ' + error.message;
      }
    });
    loadStudy();
  }

  document.addEventListener('DOMContentLoaded', () => {
    const page = document.body.dataset.page;
    if (page === 'studies') {
      const form = document.getElementById('search');
      form.addEventListener('submit', (event) => { event.preventDefault(); loadStudies(); });
      form.addEventListener('reset', () => setTimeout(loadStudies, 0));
      if (document.body.dataset.viewer !== '1') document.getElementById('nav-viewer').classList.add('hidden');
      setUpUpload();
      loadStudies();
    } else if (page === 'study') {
      setUpStudy();
    }
  });
})();
