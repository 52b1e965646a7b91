"""The machinery of one request, apart from the methods: the hard freeze (:mod:`.freeze`), statistics of a split
(:mod:`.splits`), what searches score and how fast (:mod:`.validation`), the step and learning-rate searches
(:mod:`.step_search`, :mod:`.lr_search`), and the report inside the fit (:mod:`.results`)."""
