"""The explorer's web app (Starlette): a JSON API, PNG images by index position, one page.

Routes (every image is named by a database position or a query id, never by a
path from the request, so nothing but the index's own images is served):

  GET  /                               the page (static/index.html)
  GET  /static/{app.js|style.css}      the page's script and style (a fixed list)
  GET  /api/facts                      model, bits, concepts, mAP@R, classes
  POST /api/query/image                body: the image file's bytes (capped)
  POST /api/query/text                 {"text": "..."}
  POST /api/query/item                 {"position": 12}
  POST /api/query/composite            {"parts": [["q0", [0, 1]], ["q3", [2]]]}
  POST /api/search                     {"query": "q0", "weights": [1, 0, 2, 1], "k": 24}
  GET  /api/gallery/{concept}          the database grouped by that sub-code
  GET  /img/db/{position}.png          a database item as the model sees it
  GET  /img/db/{position}/{concept}.png     with that concept's attention
  GET  /img/query/{id}.png, /img/query/{id}/{concept}.png   the same, of a query

A refused request answers 400 {"error": message}; the page shows the message.
"""
import functools
import importlib.resources
import json
import re

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from concepthash_jax.explore import engine

MAX_UPLOAD_BYTES = 20 * 1024 * 1024
_MAX_JSON_BYTES = 64 * 1024
_STATIC = {'app.js': 'text/javascript', 'style.css': 'text/css',
           'index.html': 'text/html'}
_QUERY_ID = re.compile(r'q\d{1,12}')


class _TooLarge(engine.RequestError):
  """A request body over its cap."""


@functools.lru_cache(maxsize=None)
def static_file(name: str) -> bytes:
  """A file of the package's static/ folder, by its name in the fixed list."""
  return importlib.resources.files('concepthash_jax.explore').joinpath(
      'static', name).read_bytes()


async def read_body(request: Request, limit: int) -> bytes:
  """The request body, refused as soon as it passes `limit` bytes."""
  declared = request.headers.get('content-length')
  if declared is not None and declared.isdigit() and int(declared) > limit:
    raise _TooLarge(f'The upload is {int(declared) / 2**20:.1f} MiB; the '
                    f'explorer takes at most {limit / 2**20:.0f} MiB.')
  chunks, size = [], 0
  async for chunk in request.stream():
    size += len(chunk)
    if size > limit:
      raise _TooLarge(f'The upload is larger than {limit / 2**20:.0f} MiB, '
                      'the most the explorer takes.')
    chunks.append(chunk)
  return b''.join(chunks)


async def read_json(request: Request) -> dict:
  """The JSON object of a request body (RequestError when it is not one)."""
  body = await read_body(request, _MAX_JSON_BYTES)
  try:
    value = json.loads(body or b'{}')
  except ValueError as e:
    raise engine.RequestError(f'The request is not JSON ({e}).') from e
  if not isinstance(value, dict):
    raise engine.RequestError('The request must be a JSON object.')
  return value


def _png(image) -> Response:
  return Response(engine.png_bytes(image), media_type='image/png',
                  headers={'Cache-Control': 'private, max-age=3600'})


def _query_id(request: Request) -> str:
  query_id = request.path_params['query_id']
  if not _QUERY_ID.fullmatch(query_id):
    raise HTTPException(404)
  return query_id


def create_app(explorer: engine.Explorer, *,
               max_upload_bytes: int = MAX_UPLOAD_BYTES) -> Starlette:
  """The Starlette app serving one `engine.Explorer`."""

  def answers(handler):
    """Runs a handler; a RequestError becomes 400 {"error": ...}."""
    @functools.wraps(handler)
    async def wrapped(request):
      try:
        return await handler(request)
      except _TooLarge as e:
        return JSONResponse({'error': str(e)}, status_code=413)
      except engine.RequestError as e:
        return JSONResponse({'error': str(e)}, status_code=400)
    return wrapped

  async def page(request):
    del request
    return Response(static_file('index.html'), media_type='text/html')

  async def static(request):
    name = request.path_params['name']
    if name not in _STATIC or name == 'index.html':
      raise HTTPException(404)
    return Response(static_file(name), media_type=_STATIC[name])

  async def facts(request):
    del request
    return JSONResponse(explorer.facts())

  async def query_image(request):
    data = await read_body(request, max_upload_bytes)
    title = request.query_params.get('name', 'upload')[:200]
    query_id = await run_in_threadpool(explorer.add_image_query, data, title)
    return JSONResponse(explorer.describe(query_id))

  async def query_text(request):
    body = await read_json(request)
    query_id = await run_in_threadpool(explorer.add_text_query,
                                       body.get('text'))
    return JSONResponse(explorer.describe(query_id))

  async def query_item(request):
    body = await read_json(request)
    query_id = explorer.add_item_query(body.get('position'))
    return JSONResponse(explorer.describe(query_id))

  async def query_composite(request):
    body = await read_json(request)
    parts = body.get('parts')
    if not isinstance(parts, list) or not all(
        isinstance(p, list) and len(p) == 2 and isinstance(p[1], list)
        for p in parts):
      raise engine.RequestError('parts must be [[query id, [concepts]], ...].')
    query_id = explorer.add_composite_query(parts)
    return JSONResponse(explorer.describe(query_id))

  async def search(request):
    body = await read_json(request)
    found = await run_in_threadpool(
        functools.partial(explorer.search, body.get('query'), k=body.get('k'),
                          weights=body.get('weights'),
                          concepts=body.get('concepts')))
    return JSONResponse(found)

  async def gallery(request):
    found = await run_in_threadpool(explorer.gallery,
                                    request.path_params['concept'])
    return JSONResponse(found)

  async def db_image(request):
    image, _ = await _db_drawing(request)
    return _png(image)

  async def db_overlay(request):
    image, attn = await _db_drawing(request)
    return _png(explorer.concept_overlay(image, attn,
                                         request.path_params['concept']))

  async def _db_drawing(request):
    try:
      position = explorer.check_position(request.path_params['position'])
    except engine.RequestError as e:
      raise HTTPException(404) from e
    return await run_in_threadpool(explorer.drawing, position)

  async def query_picture(request):
    image, _ = explorer.query_drawing(_query_id(request))
    return _png(image)

  async def query_overlay(request):
    image, attn = explorer.query_drawing(_query_id(request))
    return _png(explorer.concept_overlay(image, attn,
                                         request.path_params['concept']))

  routes = [
      Route('/', page),
      Route('/static/{name:str}', static),
      Route('/api/facts', answers(facts)),
      Route('/api/query/image', answers(query_image), methods=['POST']),
      Route('/api/query/text', answers(query_text), methods=['POST']),
      Route('/api/query/item', answers(query_item), methods=['POST']),
      Route('/api/query/composite', answers(query_composite), methods=['POST']),
      Route('/api/search', answers(search), methods=['POST']),
      Route('/api/gallery/{concept:int}', answers(gallery)),
      Route('/img/db/{position:int}.png', answers(db_image)),
      Route('/img/db/{position:int}/{concept:int}.png', answers(db_overlay)),
      Route('/img/query/{query_id:str}.png', answers(query_picture)),
      Route('/img/query/{query_id:str}/{concept:int}.png',
            answers(query_overlay)),
  ]
  return Starlette(routes=routes)
