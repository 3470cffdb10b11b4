"""Identity from the IdP (issue 14): config, token verification, the enrollment service."""
