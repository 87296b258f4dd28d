"""Ways to start a cluster on other machines.

- :class:`distributed.deploy.ssh.SSHCluster` (and the ``dssh`` command, alias
  ``dcluster``): a center and workers started over SSH with the system
  ``ssh`` client::

      from distributed.deploy.ssh import SSHCluster
      with SSHCluster(["node1", "node2"], nthreads=4) as cluster:
          e = Executor(cluster)

- :class:`distributed.deploy.jobqueue.SLURMCluster` (and ``dslurm``; also
  ``PBSCluster``, ``SGECluster``, ``LSFCluster``): a center here and workers
  as batch jobs of an HPC scheduler::

      from distributed.deploy.jobqueue import SLURMCluster
      with SLURMCluster(jobs=4, cores=8, memory="16GB", walltime="01:00:00") as cluster:
          e = Executor(cluster)

:class:`distributed.LocalCluster` starts one on this machine.  All three
subclass :class:`distributed.deploy.cluster.Cluster`: ``center_address``,
``security``, ``close()``, ``await cluster._close()`` and ``with``.
"""
