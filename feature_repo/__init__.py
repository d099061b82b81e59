"""homefeed's Feast feature repository (entities, sources, views, services).

`feast apply` from this folder works as usual (it reads feature_store.yaml and imports the
modules); `homefeed features apply` does the same for one dataset with its paths filled in.
"""
