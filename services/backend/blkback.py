"""`python -m services.backend.blkback`: dom0's blkback.

It serves every vbd the toolstack puts under ``/local/domain/0/backend/vbd``
(see :mod:`services.backend.blkback_service`) and answers
:class:`~services.backend.blkback_messages.ExecLogRequest` on its endpoint.
"""

from shared.service import main

if __name__ == "__main__":
    from services.backend.blkback_service import setup

    main("blkback", setup)
