"""A server on 127.0.0.1 that serves a JSON Schema at any path and records every request it gets."""

from aiohttp import web

from tests.fakes.common import LocalServer


class SchemaHost(LocalServer):
    """Where a hostile `$ref` points: `hits` lists the paths requested, which must stay empty."""

    def __init__(self) -> None:
        super().__init__()
        self.hits: list[str] = []

    async def start(self) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._serve)
        return await self.serve(app)

    async def _serve(self, request: web.Request) -> web.Response:
        self.hits.append(request.path)
        return web.json_response({"type": "string"})
