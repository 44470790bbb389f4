"""The landing page (``/``): what the dataset holds, where to go, or how to build a store."""

from __future__ import annotations

import streamlit as st

from . import first_run
from .state import current_view, data_folder

_BUILD_HELP = """\
VisionLens reads datasets ("stores") built beforehand. Build the three demo
stores (multiclass, multilabel and detection, two models each) with

```bash
visionlens demo --out {folder}
```

or ingest your own, for example

```bash
visionlens ingest --task detection --coco annotations.json --images-root images/ \\
    --predictions detections.json --out {folder}/my-dataset
```

then reload this page. The app serves every store in `./data`, or in the folder
named by the `VISIONLENS_DATA` environment variable.
"""


def render() -> None:
    view = current_view()
    if view is None:
        st.title("VisionLens")
        folder = data_folder()
        st.info(f"No dataset could be opened in `{folder}`.", icon=":material/database:")
        st.markdown(_BUILD_HELP.format(folder=folder))
        return
    st.title(view.store.name)
    st.caption(f"{view.task} classification" if view.task != "detection" else "object detection")
    cols = st.columns(4)
    cols[0].metric("Images", f"{view.total():,}")
    cols[1].metric("Classes" if view.task != "multilabel" else "Labels", len(view.classes))
    cols[2].metric("Models", len(view.catalog.models))
    cols[3].metric("Saved cohorts", len(view.saved_cohorts()))
    if view.catalog.models:
        # In the order they were added (the first is the default), with the explanation maps stored so far.
        models = view.query('SELECT model_id AS "Model", name AS "Name" FROM "models"')
        if view.store.has_table("explanations"):
            maps = view.query('SELECT model_id AS "Model", count(*) AS "Explanation maps", '
                              'count(DISTINCT image_id) AS "Images explained" FROM "explanations" GROUP BY ALL')
            models = models.merge(maps, on="Model", how="left").fillna(0)
            models[["Explanation maps", "Images explained"]] = models[["Explanation maps",
                                                                        "Images explained"]].astype(int)
        st.dataframe(models, hide_index=True, width="content")
    first_run.explanation_status(view)
    st.subheader("Where to next")
    from .nav import page_links

    page_links(view, with_home=False)
