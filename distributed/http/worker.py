"""HTTP service of a worker: ``/info.json`` and ``/resources.json``.

::

    w = Worker(center_ip, center_port, services={'http': HTTPWorker})
    yield w._start()
    # GET http://<worker ip>:<w.service_ports['http']>/info.json
"""

import psutil

from .base import HTTPService, JSONHandler, json_key


class Info(JSONHandler):
    def get_json(self):
        w = self.node
        return {
            "address": w.address,
            "ncores": w.ncores,
            "name": w.name,
            "keys": [json_key(k) for k in w.data],
            "active": [json_key(k) for k in w.active],
            "nbytes": sum(w.nbytes.values()),
            "center": w.center.address,
            "services": w.service_ports,
            **w.memory_state(),
        }


class Resources(JSONHandler):
    def get_json(self):
        p = psutil.Process()
        mem = psutil.virtual_memory()
        return {
            "cpu": p.cpu_percent(interval=None),
            "cpu_system": psutil.cpu_percent(interval=None),
            "memory": p.memory_info().rss,
            "memory_percent": p.memory_percent(),
            "memory_total": mem.total,
            "memory_available": mem.available,
        }


class HTTPWorker(HTTPService):
    routes = [(r"/info.json", Info), (r"/resources.json", Resources)]
