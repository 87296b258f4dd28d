"""HTTP service of a center: ``/info.json``, ``/who_has.json``, ``/ncores.json``."""

from .base import HTTPService, JSONHandler, json_key


class Info(JSONHandler):
    def get_json(self):
        c = self.node
        return {
            "address": c.address,
            "workers": list(c.ncores),
            "ncores": c.ncores,
            "nkeys": len(c.who_has),
            "services": c.service_ports,
        }


class WhoHas(JSONHandler):
    def get_json(self):
        return {json_key(k): sorted(v) for k, v in self.node.who_has.items()}


class HasWhat(JSONHandler):
    def get_json(self):
        return {a: [json_key(k) for k in v] for a, v in self.node.has_what.items()}


class NCores(JSONHandler):
    def get_json(self):
        return dict(self.node.ncores)


class HTTPCenter(HTTPService):
    routes = [
        (r"/info.json", Info),
        (r"/who_has.json", WhoHas),
        (r"/has_what.json", HasWhat),
        (r"/ncores.json", NCores),
    ]
