"""Dynamic NFS sub-directory provisioner for Kubernetes, written with kopf.

For every PersistentVolumeClaim of a StorageClass that names this provisioner, a directory is
created under the mounted NFS export and a matching NFS PersistentVolume is written. The public
surface is the ``nfs-provisioner`` command (``provisioner.__main__``); everything else is internal.
"""

__version__ = "0.1.0"
