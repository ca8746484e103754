"""Voice: Asterisk FastAGI intake, AMI answer timing, missed-call callbacks, classic AGI."""
