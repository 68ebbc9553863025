"""Pages for people: the latent-space explorer (`/explorer`, static HTML, CSS and JavaScript modules in
`static/`, calling only the service's own endpoints) and the API documentation (`/docs`, `/redoc`) with
their assets served locally, so both work with no network. Imports the API-key tags only."""
