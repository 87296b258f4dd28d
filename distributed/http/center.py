"""HTTP service of a center: the dashboard (see :mod:`distributed.dashboard`)
and ``/info.json``, ``/who_has.json``, ``/has_what.json``, ``/ncores.json``.

::

    c = Center('127.0.0.1', services={'http': HTTPCenter})
    c.listen(0)
    # http://127.0.0.1:<c.service_ports['http']>/status
"""

from ..dashboard.metrics import center_registry
from ..dashboard.plugin import DashboardPlugin
from ..dashboard.routes import Updates, dashboard_routes
from .base import HTTPService, JSONHandler, json_key

#: the dashboard's port unless told otherwise (a free one if it is taken)
DASHBOARD_PORT = 8797


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
    """The dashboard and JSON routes of ``center``; watches its scheduler
    through a :class:`~distributed.dashboard.plugin.DashboardPlugin` while
    it runs."""

    routes = dashboard_routes() + [
        (r"/info.json", Info),
        (r"/who_has.json", WhoHas),
        (r"/has_what.json", HasWhat),
        (r"/ncores.json", NCores),
    ]
    default_port = DASHBOARD_PORT

    def __init__(self, center, address=None):
        super().__init__(center, address)
        self.plugin = DashboardPlugin(center.scheduler)
        center.scheduler.add_plugin(self.plugin)
        self.registry = center_registry(center, self.plugin)
        self.sockets = set()
        self.updates = Updates(self)

    def start_updates(self):
        self.updates.start()

    def stop(self):
        self.updates.stop()
        for socket in list(self.sockets):
            socket.close()
        if self.plugin in self.node.scheduler.plugins:
            self.node.scheduler.remove_plugin(self.plugin)
        super().stop()
