"""PyTorch reference for the ConceptHash CPU train-step benchmark (authors' style).

Re-implements (own code, same compute) the released ConceptHash config
`concept_hash_final_v1_nosa_apt` of kamwoh/concepthash (models.arch.coop.LGHWithFixedPrompt
+ models.loss.coop.LGHLoss + trainers.coop.COOPTrainer.train_one_batch) on a RANDOM-weight
CLIP ViT-B/32 vision tower built from transformers.CLIPVisionConfig (no downloads):

  * HF CLIPEncoderLayer modules (eager attention) with AdaptFormer adapters beside attention
    and MLP in every layer: a = MSA(LN1 z); z = z + a + A1(a); m = MLP(LN2 z); z = z + m + A2(m),
    A(x) = scale * up(dropout(GELU(down(LN(x))))), bottleneck 384, up zero-initialised.
  * 4 generated concept tokens (queries (1,4,512) -> MHA 8 heads + FFN 512 -> Linear 512->768)
    appended after the position embeddings, before pre_layrnorm.
  * Encoder run with all attentions and hidden states kept (the released code passes
    output_attentions=True, output_hidden_states=True), post_layernorm + visual_projection on
    CLS (computed and unused, as released), code head Linear(768,16,no bias) on
    Z_m + hash_pe, concat -> BatchNorm1d(64).
  * Language centers: fixed sign(text embeddings) (200,512) -> Linear-ReLU-Linear -> (200,64).
  * Losses: cosine CE with scale 8 margin 0.2 on cont + bin logits and on concept logits
    (CosSim over 200 learned centroids on Z_m + concept_pe; margin only on the first concept,
    as the released scatter does).
  * CLIP weights frozen (requires_grad=False); SGD(momentum .9) on adapters + added modules.

Prints one JSON line: {"train_img_s", "eval_img_s", "peak_rss_gb", "torch", ...}.
"""
import argparse
import json
import math
import resource
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers
from transformers import CLIPVisionConfig, CLIPVisionModel


class Adapter(nn.Module):
  """AdaptFormer bottleneck: LN -> down -> GELU(erf) -> dropout -> up -> * learnable scale."""

  def __init__(self, dim, bottleneck, dropout=0.0):
    super().__init__()
    self.adapter_layer_norm = nn.LayerNorm(dim)
    self.down_proj = nn.Linear(dim, bottleneck)
    self.up_proj = nn.Linear(bottleneck, dim)
    self.scale = nn.Parameter(torch.ones(1))
    self.dropout = dropout
    with torch.no_grad():
      nn.init.kaiming_uniform_(self.down_proj.weight, a=math.sqrt(5))
      nn.init.zeros_(self.down_proj.bias)
      nn.init.zeros_(self.up_proj.weight)
      nn.init.zeros_(self.up_proj.bias)

  def forward(self, x):
    y = F.gelu(self.down_proj(self.adapter_layer_norm(x)))
    y = F.dropout(y, p=self.dropout, training=self.training)
    return self.up_proj(y) * self.scale


class AdaptedLayer(nn.Module):
  """Wraps one HF CLIPEncoderLayer (its LNs, attention, MLP) with two parallel adapters."""

  def __init__(self, hf_layer, bottleneck, dropout=0.0):
    super().__init__()
    self.layer = hf_layer
    dim = hf_layer.embed_dim
    self.adapt_mlp_1 = Adapter(dim, bottleneck, dropout)
    self.adapt_mlp_2 = Adapter(dim, bottleneck, dropout)

  def forward(self, z):
    a, probs = self.layer.self_attn(hidden_states=self.layer.layer_norm1(z), attention_mask=None)
    z = z + a + self.adapt_mlp_1(a)
    m = self.layer.mlp(self.layer.layer_norm2(z))
    z = z + m + self.adapt_mlp_2(m)
    return z, probs


class ConceptHashTorch(nn.Module):
  """LGHWithFixedPrompt with the released config (M=4, K=64, adapters 384)."""

  def __init__(self, num_classes=200, nbit=64, ncontext=4, adapter_dim=384, heads=8,
               gen_dropout=0.1, text_width=512):
    super().__init__()
    cfg = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                           num_attention_heads=12, patch_size=32, image_size=224,
                           projection_dim=512, hidden_act='quick_gelu', layer_norm_eps=1e-5,
                           attention_dropout=0.0)
    cfg._attn_implementation = 'eager'  # Released code returns every attention map.
    clip = CLIPVisionModel(cfg)
    # transformers 4.x holds CLIPVisionModel's modules in .vision_model, 5.x on the model itself.
    self.vision = getattr(clip, 'vision_model', clip)  # embeddings, pre_layrnorm, encoder, post_layernorm
    d, p = cfg.hidden_size, cfg.projection_dim
    # CLIPModel.visual_projection (frozen; applied to the pooled CLS in the released forward).
    self.visual_projection = nn.Linear(d, p, bias=False)
    self.layers = nn.ModuleList(AdaptedLayer(l, adapter_dim) for l in self.vision.encoder.layers)
    del self.vision.encoder  # Its layers live in self.layers.
    self.nbit, self.ncontext, self.d = nbit, ncontext, d

    # Concept-token generator (released `hash_queries` + `hash_attention`).
    self.hash_queries = nn.Parameter(torch.randn(1, ncontext, p))
    self.gen_sa = nn.MultiheadAttention(p, heads, batch_first=True, dropout=gen_dropout)
    self.gen_ffn = nn.Sequential(nn.Linear(p, p), nn.ReLU(), nn.Dropout(gen_dropout),
                                 nn.Linear(p, p))
    self.gen_norm1 = nn.LayerNorm(p)
    self.gen_norm2 = nn.LayerNorm(p)
    self.gen_ffn2 = nn.Linear(p, d)
    # Codes.
    self.hash_pe = nn.Parameter(torch.randn(1, ncontext, d))  # E (concept specificity)
    self.hash_fc = nn.Linear(d, nbit // ncontext, bias=False)  # h
    self.hash_bn = nn.BatchNorm1d(nbit)
    # Language centers: sign of CLIP text features (random stand-in), then t = MLP.
    self.register_buffer('center', torch.randn(num_classes, text_width).sign())
    self.text_projection = nn.Sequential(nn.Linear(text_width, text_width), nn.ReLU(),
                                         nn.Linear(text_width, nbit))
    # Concept discrimination head.
    self.concept_pe = nn.Parameter(torch.randn(1, ncontext, d) * 0.02)  # E'
    self.concept_centroids = nn.Parameter(torch.randn(num_classes, d))  # CosSim W

  def frozen_modules(self):
    """The pretrained CLIP pieces: vision tower (its layers moved into self.layers) + proj."""
    return [self.vision, self.visual_projection] + [l.layer for l in self.layers]

  def trainable_parameters(self):
    frozen = {id(q) for m in self.frozen_modules() for q in m.parameters()}
    return [q for q in self.parameters() if id(q) not in frozen]

  def concept_tokens(self):
    x = self.hash_queries
    x = self.gen_norm1(x) + self.gen_sa(x, x, x)[0]
    x = self.gen_norm2(x) + self.gen_ffn(x)
    return self.gen_ffn2(x)  # (1, M, D)

  def forward(self, pixels):
    b = pixels.size(0)
    emb = self.vision.embeddings
    patches = emb.patch_embedding(pixels).flatten(2).transpose(1, 2)
    x = torch.cat([emb.class_embedding.expand(b, 1, -1), patches], dim=1)
    x = x + emb.position_embedding(emb.position_ids)
    x = torch.cat([x, self.concept_tokens().repeat(b, 1, 1)], dim=1)
    x = self.vision.pre_layrnorm(x)
    hidden_states, attentions = [x], []
    for layer in self.layers:
      x, probs = layer(x)
      hidden_states.append(x)
      attentions.append(probs)
    pooled = self.visual_projection(self.vision.post_layernorm(x[:, 0]))
    feats = x[:, -self.ncontext:]  # Z_m, no post-LN (use_before_projection=True)
    codes = self.hash_bn(self.hash_fc(feats + self.hash_pe.repeat(b, 1, 1)).reshape(b, -1))
    centers = self.text_projection(self.center)
    codes_l2 = F.normalize(codes, dim=-1)
    centers_l2 = F.normalize(centers, dim=-1)
    logits_cont = codes_l2 @ centers_l2.t()
    logits_bin = codes_l2 @ (centers_l2.sign() / self.nbit ** 0.5).t()
    cf = (feats + self.concept_pe.repeat(b, 1, 1)).reshape(b * self.ncontext, -1)
    logits_concept = (F.normalize(cf, dim=-1) @ F.normalize(self.concept_centroids, dim=-1).t())
    logits_concept = logits_concept.reshape(b, self.ncontext, -1).transpose(0, 1)  # (M, B, C)
    return pooled, {'codes': codes, 'logits_cont': logits_cont, 'logits_bin': logits_bin,
                    'logits_concept': logits_concept, 'hash_features': feats,
                    'hidden_states': tuple(hidden_states), 'attentions': tuple(attentions)}


def margin_logits(logits, labels, scale, margin):
  """Released LGHLoss.compute_margin_logits for int labels (3-D: margin on concept 0 only)."""
  onehot = torch.zeros_like(logits)
  if logits.dim() == 3:
    onehot.scatter_(-1, labels.unsqueeze(-1).unsqueeze(0), margin)
  else:
    onehot.scatter_(1, labels.unsqueeze(-1), margin)
  return scale * (logits - onehot)


def ce(logits, labels, scale=8.0, margin=0.2):
  logits = margin_logits(logits, labels, scale, margin)
  if logits.dim() == 3:
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)),
                           labels.unsqueeze(0).repeat(logits.size(0), 1).reshape(-1))
  return F.cross_entropy(logits, labels)


def criterion(out, labels):
  """Released loss_scales: concept 1, cont 1, bin 1 (others 0); quan metric under no_grad."""
  with torch.no_grad():
    quan = 1 - F.cosine_similarity(out['codes'], out['codes'].sign(), dim=-1).mean()
  losses = {'concept': ce(out['logits_concept'], labels), 'cont': ce(out['logits_cont'], labels),
            'bin': ce(out['logits_bin'], labels)}
  total = losses['concept'] + losses['cont'] + losses['bin']
  return total, dict(losses, quan=quan)


def accuracies(out, labels):
  """As COOPTrainer: argmax accuracy of every *logits* output (3-D: mean over concepts)."""
  accs = {}
  for k, v in out.items():
    if 'logits' in k:
      v = v.mean(0) if v.dim() == 3 else v
      accs[k] = (v.argmax(1) == labels).float().mean().item()
  return accs


def count(params):
  return sum(q.numel() for q in params)


# --precision: how the matmuls run. 'float32' is the released code (PyTorch's default:
# no TF32); 'tf32' lets CUDA's float32 matmuls and convolutions use TF32 (what XLA:GPU
# does for float32 at its default precision); 'bfloat16' runs the forward under
# torch.autocast (not in the release: PyTorch's usual way to train in bf16).
PRECISIONS = ('float32', 'tf32', 'bfloat16')


# The batch the released code encodes its query and database splits at: its test and db
# loaders take config.batch_size (trainers/base.py, load_dataloader), 32 in the released
# ConceptHash config.
RELEASED_EVAL_BATCH = 32


def build_reference(batch=32, num_classes=200, threads=2, lr=1e-3, wd=5e-5,
                    device='cpu', precision='float32'):
  """The authors' train step and eval step as closures over one model: (train, eval, info).

  `train()` runs one SGD step and returns the loss; `eval()` one no-grad forward + loss
  (COOPTrainer.inference_one_batch). Both end in `.item()`, which waits for the device.
  `info['eval_at'](n)` gives the eval step on n images. Shared by main() and
  side_by_side.py.
  """
  if precision not in PRECISIONS:
    raise ValueError(f'precision {precision!r} is not one of {PRECISIONS}')
  torch.set_num_threads(threads)
  torch.backends.cuda.matmul.allow_tf32 = precision == 'tf32'
  torch.backends.cudnn.allow_tf32 = precision == 'tf32'
  torch.manual_seed(0)
  model = ConceptHashTorch(num_classes=num_classes).to(device)
  # As BaseTrainer.load_optimizer_and_scheduler: everything frozen, then trainables enabled.
  model.requires_grad_(False)
  trainable = model.trainable_parameters()
  for q in trainable:
    q.requires_grad_(True)
  opt = torch.optim.SGD(trainable, lr=lr, momentum=0.9, weight_decay=wd, nesterov=False)
  info = {'params_total': count(model.parameters()), 'params_trainable': count(trainable),
          'params_adapters': count(q for l in model.layers
                                   for a in (l.adapt_mlp_1, l.adapt_mlp_2)
                                   for q in a.parameters()),
          'params_visual_projection': count(model.visual_projection.parameters()),
          'torch': torch.__version__, 'transformers': transformers.__version__,
          'threads': torch.get_num_threads(), 'batch': batch, 'device': device,
          'precision': precision}

  g = torch.Generator().manual_seed(0)
  images = torch.randn(batch, 3, 224, 224, generator=g).to(device)
  labels = torch.randint(0, num_classes, (batch,), generator=g).to(device)

  def autocast():
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16,
                          enabled=precision == 'bfloat16')

  def train_step():
    model.train()
    opt.zero_grad()
    with autocast():
      _, out = model(images)
      loss, losses = criterion(out, labels)
    loss.backward()
    opt.step()
    loss.item()
    for v in losses.values():
      v.item()
    accuracies(out, labels)
    return loss.item()

  def eval_at(eval_batch):
    """The eval step on `eval_batch` images, as a closure."""
    eval_images, eval_labels = images, labels
    if eval_batch != batch:
      eval_images = torch.randn(eval_batch, 3, 224, 224, generator=g).to(device)
      eval_labels = torch.randint(0, num_classes, (eval_batch,), generator=g).to(device)

    def eval_step():  # As COOPTrainer.inference_one_batch: forward + loss under no_grad.
      model.eval()
      with torch.no_grad(), autocast():
        _, out = model(eval_images)
        l, _ = criterion(out, eval_labels)
        l.item()
        accuracies(out, eval_labels)
        return out['codes']

    return eval_step

  info['eval_at'] = eval_at
  return train_step, eval_at(batch), info


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--batch', type=int, default=32)
  ap.add_argument('--num_classes', type=int, default=200)
  ap.add_argument('--threads', type=int, default=2)
  ap.add_argument('--warmup', type=int, default=2)
  ap.add_argument('--steps', type=int, default=8)
  ap.add_argument('--eval_warmup', type=int, default=1)
  ap.add_argument('--eval_steps', type=int, default=8)
  ap.add_argument('--lr', type=float, default=1e-3)
  ap.add_argument('--wd', type=float, default=5e-5)  # Released sgd.yaml: 5e-4 (no cost effect).
  ap.add_argument('--device', default='cpu', help='torch device: cpu, cuda')
  ap.add_argument('--precision', default='float32', choices=PRECISIONS)
  args = ap.parse_args()

  t0 = time.perf_counter()
  train_step, eval_step, info = build_reference(args.batch, args.num_classes, args.threads,
                                                args.lr, args.wd, args.device, args.precision)
  setup_s = time.perf_counter() - t0
  for _ in range(args.warmup):
    train_step()
  t0 = time.perf_counter()
  for _ in range(args.steps):
    loss = train_step()
  train_ips = args.steps * args.batch / (time.perf_counter() - t0)

  for _ in range(args.eval_warmup):
    eval_step()
  t0 = time.perf_counter()
  for _ in range(args.eval_steps):
    eval_step()
  eval_ips = args.eval_steps * args.batch / (time.perf_counter() - t0)
  rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB -> GiB
  device_gb = (torch.cuda.max_memory_allocated() / 2 ** 30
               if torch.device(args.device).type == 'cuda' else 0.0)

  print(json.dumps({
      'train_img_s': round(train_ips, 3), 'eval_img_s': round(eval_ips, 3),
      'peak_rss_gb': round(rss_gb, 3), 'peak_device_gb': round(device_gb, 3),
      'setup_s': round(setup_s, 1), 'steps': args.steps, 'eval_steps': args.eval_steps,
      'loss': round(loss, 4), **{k: v for k, v in info.items() if k != 'eval_at'}}))


if __name__ == '__main__':
  main()
