"""Detection data: the built-in synthetic dataset, the COCO loader, DETR's transforms and batching."""


class DataError(ValueError):
    """Bad dataset content or layout: reported as one line naming the file or annotation."""


from dndetr.data.annotations import AnnotationProblems, object_stats, queries_warning  # noqa: E402
from dndetr.data.coco import CocoDetection, build_dataset, collate, num_classes  # noqa: E402
from dndetr.data.synthetic import ensure_synthetic  # noqa: E402
from dndetr.data.transforms import build_transforms  # noqa: E402

__all__ = ["DataError", "AnnotationProblems", "CocoDetection", "build_dataset", "build_transforms", "collate",
           "ensure_synthetic", "num_classes", "object_stats", "queries_warning"]
