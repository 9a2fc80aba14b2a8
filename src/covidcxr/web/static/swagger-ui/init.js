// Starts Swagger UI for /docs from same-origin files only. It is a file (not an inline script) so the docs page
// keeps script-src 'self'; validatorUrl null stops the UI from asking validator.swagger.io about the schema.
window.ui = SwaggerUIBundle({
  url: document.getElementById("swagger-ui").dataset.openapiUrl,
  dom_id: "#swagger-ui",
  layout: "BaseLayout",
  deepLinking: true,
  showExtensions: true,
  showCommonExtensions: true,
  validatorUrl: null,
  presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
});
