// The explorer page: one query at a time, ranked again whenever a concept
// control changes. Every text from the server goes in through textContent.
'use strict';

const state = {facts: null, query: null, weights: [], on: [], parts: [],
               searchSeq: 0};

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === 'class') node.className = value;
    else if (key === 'text') node.textContent = value;
    else if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) if (child) node.append(child);
  return node;
}

function say(text, info) {
  const box = document.getElementById('message');
  box.textContent = text || '';
  box.className = info ? 'info' : '';
}

async function call(url, options) {
  const response = await fetch(url, options);
  let body;
  try { body = await response.json(); } catch (e) { body = {}; }
  if (!response.ok) {
    throw new Error(body.error || `The server answered ${response.status}.`);
  }
  return body;
}

function postJson(url, value) {
  return call(url, {method: 'POST', headers: {'Content-Type': 'application/json'},
                    body: JSON.stringify(value)});
}

// ------------------------------------------------------------------ facts

function showFacts(facts) {
  const box = document.getElementById('facts');
  box.textContent = '';
  const add = (text) => box.append(el('span', {class: 'fact', text}));
  add(`model ${facts.model}`);
  add(`${facts.nbit} bits = ${facts.num_concepts} concepts x ${facts.bits_per_concept}`);
  const map = facts.metrics.map_at_r;
  add(map === undefined ? 'mAP@R: no results.json' : `mAP@R ${map.toFixed(4)}`);
  add(`database: ${facts.database_size} items, ${facts.database}`);
  const classes = el('details', {}, el('summary', {text: `${facts.class_names.length} classes`}),
                     el('span', {text: facts.class_names.join(', ')}));
  box.append(classes);
}

// --------------------------------------------------------------- concepts

function buildConcepts(count) {
  const table = document.getElementById('concepts');
  table.textContent = '';
  state.weights = Array(count).fill(1);
  state.on = Array(count).fill(true);
  for (let m = 0; m < count; m++) {
    const box = el('input', {type: 'checkbox', id: `concept-on-${m}`});
    box.checked = true;
    box.addEventListener('change', () => { state.on[m] = box.checked; research(); });
    const weight = el('input', {type: 'number', id: `concept-weight-${m}`, min: '0',
                                step: '1', value: '1'});
    weight.addEventListener('change', () => {
      const value = Math.max(0, Math.round(Number(weight.value) || 0));
      weight.value = value;
      state.weights[m] = value;
      research();
    });
    const gallery = el('button', {class: 'link', id: `gallery-${m}`, text: 'gallery',
                                  onclick: () => showGallery(m)});
    table.append(el('tr', {}, el('td', {}, box),
                    el('td', {}, el('label', {for: `concept-on-${m}`, text: `concept ${m}`})),
                    el('td', {}, el('span', {text: 'weight '}), weight),
                    el('td', {}, gallery)));
  }
}

function setConcepts(weights) {
  weights.forEach((w, m) => {
    state.on[m] = w > 0;
    state.weights[m] = w > 0 ? w : 1;
    document.getElementById(`concept-on-${m}`).checked = w > 0;
    document.getElementById(`concept-weight-${m}`).value = state.weights[m];
  });
}

function currentWeights() {
  return state.weights.map((w, m) => (state.on[m] ? w : 0));
}

// ----------------------------------------------------------------- query

function showQuery(query) {
  state.query = query;
  const box = document.getElementById('query');
  box.textContent = '';
  box.append(el('div', {class: 'title', text: `${query.kind}: ${query.title}`}));
  const maps = el('div', {class: 'maps'});
  if (query.has_image) {
    maps.append(el('figure', {}, el('img', {class: 'small', src: `/img/query/${query.id}.png`,
                                            alt: 'query'}), el('code', {text: 'image'})));
  } else if (query.kind === 'item') {
    maps.append(el('figure', {}, el('img', {class: 'small',
        src: `/img/db/${query.position}.png`, alt: 'query'})));
  }
  query.subcodes.forEach((code, m) => {
    let src = null;
    if (query.has_image) src = `/img/query/${query.id}/${m}.png`;
    else if (query.kind === 'item') src = `/img/db/${query.position}/${m}.png`;
    const picture = src ? el('img', {class: 'small', src, alt: `concept ${m}`}) : null;
    // A composite's left-out concepts hold filler bits: not part of the query.
    const shown = query.weights && !query.weights[m] ? 'not taken' : code;
    maps.append(el('figure', {'data-concept': m}, picture, el('code', {text: `c${m} ${shown}`})));
  });
  box.append(maps);
  if (query.note) say(`Note: ${query.note}`, true);
  document.getElementById('compose-add').disabled = false;
}

async function useQuery(promise) {
  say('');
  try {
    const query = await promise;
    if (query.weights) setConcepts(query.weights);
    showQuery(query);
    await research();
  } catch (e) {
    say(e.message);
  }
}

function uploadFile(file) {
  if (!file) return;
  useQuery(call(`/api/query/image?name=${encodeURIComponent(file.name)}`,
                {method: 'POST', body: file,
                 headers: {'Content-Type': 'application/octet-stream'}}));
}

function searchItem(position) {
  useQuery(postJson('/api/query/item', {position}));
}

// ---------------------------------------------------------------- results

async function research() {
  if (!state.query) return;
  const seq = ++state.searchSeq;
  const weights = currentWeights();
  if (!weights.some((w) => w > 0)) {
    say('Every concept is switched off; switch one on.');
    return;
  }
  try {
    const found = await postJson('/api/search', {query: state.query.id, weights,
                                                 k: state.facts.default_k});
    if (seq !== state.searchSeq) return;  // A newer search is under way.
    say(state.query.note ? `Note: ${state.query.note}` : '', true);
    showResults(found);
  } catch (e) {
    say(e.message);
  }
}

function showResults(found) {
  document.getElementById('gallery').hidden = true;
  const grid = document.getElementById('results');
  grid.hidden = false;
  grid.textContent = '';
  const encode = found.query.encode_ms === null || found.query.encode_ms === undefined ? '' :
    `, encode ${found.query.encode_ms.toFixed(0)} ms`;
  document.getElementById('status').textContent =
    `${found.results.length} nearest of ${state.facts.database_size} by weights ` +
    `[${found.weights.join(', ')}]: search ${found.search_ms.toFixed(1)} ms${encode}`;
  grid.dataset.weights = found.weights.join(',');
  grid.dataset.query = found.query.id;
  found.results.forEach((r, rank) => {
    const maps = el('div', {class: 'maps'});
    r.concept_distances.forEach((d, m) => {
      const verdict = d === 0 ? 'agree' : 'differ';
      const counted = found.weights[m] > 0 ? '' : ' off';
      const text = d === 0 ? 'agrees' : `differs by ${d} bit${d > 1 ? 's' : ''}`;
      const note = counted ? ', not counted' : '';
      const short = d === 0 ? 'agrees' : `diff ${d}`;
      maps.append(el('figure', {class: verdict + counted, title: `concept ${m}: ${text}${note}`},
                     el('img', {class: 'small', src: `/img/db/${r.position}/${m}.png`,
                                alt: `concept ${m}`, loading: 'lazy'}),
                     el('code', {text: counted ? `c${m} off` : `c${m} ${short}`})));
    });
    const card = el('div', {class: 'result', 'data-pos': r.position, 'data-rank': rank,
                            title: 'search from this item',
                            onclick: () => searchItem(r.position)},
                    el('figure', {}, el('img', {class: 'small', src: `/img/db/${r.position}.png`,
                                                alt: r.title, loading: 'lazy'})),
                    el('div', {}, el('div', {class: 'meta',
                                             text: `#${rank + 1}  d=${r.distance}  ${r.label} ${r.title}`}),
                       maps));
    grid.append(card);
  });
  grid.dataset.ready = String(state.searchSeq);
}

// ---------------------------------------------------------------- gallery

async function showGallery(concept) {
  say('');
  try {
    const found = await call(`/api/gallery/${concept}`);
    document.getElementById('results').hidden = true;
    const box = document.getElementById('gallery');
    box.hidden = false;
    box.textContent = '';
    document.getElementById('status').textContent =
      `Concept ${concept}: the database grouped by its sub-code ` +
      `(${found.num_values} values in use); each image shows where the concept looks.`;
    box.append(el('button', {class: 'link', text: 'back to the results',
                             onclick: () => { box.hidden = true;
                                              document.getElementById('results').hidden = false; }}));
    for (const group of found.groups) {
      const labels = group.labels.map(([name, n]) => `${name} ${n}`).join(', ');
      const members = el('div', {class: 'members'});
      for (const member of group.members) {
        members.append(el('figure', {class: 'member', 'data-pos': member.position,
                                     onclick: () => searchItem(member.position)},
                          el('img', {class: 'small', src: `/img/db/${member.position}/${concept}.png`,
                                     alt: member.title, loading: 'lazy'}),
                          el('span', {text: member.title})));
      }
      box.append(el('div', {class: 'group', 'data-subcode': group.subcode},
                    el('div', {}, el('code', {text: group.subcode}),
                       el('span', {text: `  ${group.count} items${labels ? ': ' + labels : ''}`})),
                    members));
    }
    box.dataset.concept = String(concept);
  } catch (e) {
    say(e.message);
  }
}

// ---------------------------------------------------------------- compose

function showParts() {
  const list = document.getElementById('compose-parts');
  list.textContent = '';
  for (const part of state.parts) {
    list.append(el('li', {text: `${part.title}: concepts ${part.concepts.join(', ')}`}));
  }
  document.getElementById('compose-go').disabled = state.parts.length === 0;
  document.getElementById('compose-clear').disabled = state.parts.length === 0;
}

function composeAdd() {
  if (!state.query) return;
  const concepts = state.on.flatMap((on, m) => (on ? [m] : []));
  state.parts.push({id: state.query.id, title: state.query.title, concepts});
  showParts();
}

function composeGo() {
  const parts = state.parts.map((p) => [p.id, p.concepts]);
  useQuery(postJson('/api/query/composite', {parts}));
}

// ------------------------------------------------------------------ start

async function start() {
  const upload = document.getElementById('upload');
  upload.addEventListener('change', () => uploadFile(upload.files[0]));
  const drop = document.getElementById('drop');
  drop.addEventListener('dragover', (e) => { e.preventDefault(); drop.classList.add('over'); });
  drop.addEventListener('dragleave', () => drop.classList.remove('over'));
  drop.addEventListener('drop', (e) => {
    e.preventDefault();
    drop.classList.remove('over');
    uploadFile(e.dataTransfer.files[0]);
  });
  document.getElementById('prompt-form').addEventListener('submit', (e) => {
    e.preventDefault();
    useQuery(postJson('/api/query/text', {text: document.getElementById('prompt').value}));
  });
  document.getElementById('compose-add').addEventListener('click', composeAdd);
  document.getElementById('compose-go').addEventListener('click', composeGo);
  document.getElementById('compose-clear').addEventListener('click', () => {
    state.parts = [];
    showParts();
  });
  try {
    state.facts = await call('/api/facts');
    showFacts(state.facts);
    buildConcepts(state.facts.num_concepts);
    if (!state.facts.text_queries) {
      document.getElementById('prompt').disabled = true;
      document.getElementById('prompt').placeholder = 'this run has no text centers';
    }
    document.body.dataset.ready = 'true';
  } catch (e) {
    say(e.message);
  }
}

start();
